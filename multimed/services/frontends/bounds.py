"""Counting before parsing. Protobuf builds a map entry by entry, in one C call that holds the
GIL: a 4 MB Predict body with a 200,000-entry gene map held it ~128 ms, an OIP ModelInfer with a
200,000-entry `parameters` map ~143 ms (64 MB: seconds), and health and every other caller
waited. The same bytes read as a skeleton of the request, which keeps only its maps, each entry
opaque bytes, take ~4 ms (measured), so a map over its limit is refused before the real parse.
The skeleton is derived from the real message's descriptor, so it cannot drift."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

F = descriptor_pb2.FieldDescriptorProto


class BodyRefused(ValueError):
    """A body refused unparsed; the message is for the caller."""


def _skeleton(root: Descriptor):
    """A message class that reads `root`'s wire bytes keeping only the maps (and the message
    fields that lead to them); None when `root` has no maps."""
    package = "multimed.skeleton." + root.full_name.replace(".", "_")
    file = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package)
    file.syntax = "proto3"
    kept: set[str] = set()  # full names of the messages the skeleton keeps

    def name(d: Descriptor) -> str:
        return d.full_name.replace(".", "_")

    def keep(d: Descriptor, visiting: frozenset[str]) -> bool:
        if d.full_name in kept:
            return True
        message = descriptor_pb2.DescriptorProto(name=name(d))
        for f in d.fields:
            sub = f.message_type
            if sub is None or sub.full_name in visiting:
                continue
            label = F.LABEL_REPEATED if f.is_repeated else F.LABEL_OPTIONAL
            if sub.GetOptions().map_entry:
                message.field.add(
                    name=f.name, number=f.number, type=F.TYPE_BYTES, label=F.LABEL_REPEATED
                )
            elif keep(sub, visiting | {d.full_name}):
                message.field.add(
                    name=f.name,
                    number=f.number,
                    type=F.TYPE_MESSAGE,
                    type_name=f".{package}.{name(sub)}",
                    label=label,
                )
        if not message.field:
            return False
        kept.add(d.full_name)
        file.message_type.append(message)
        return True

    if not keep(root, frozenset()):
        return None
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name(root)}"))


def _largest_map(message) -> tuple[str, int]:
    """(field name, entries) of the largest map anywhere in a skeleton message."""
    best = ("", 0)
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.type == FieldDescriptor.TYPE_BYTES:
            found = [(f.name, len(value))]
        elif f.is_repeated:
            found = [_largest_map(m) for m in value]
        else:
            found = [_largest_map(value)] if message.HasField(f.name) else []
        best = max([best, *found], key=lambda x: x[1])
    return best


def map_limit(message_class, limit: int, refusal: Callable[[str, int], str]):
    """A precheck for the guard: raises BodyRefused(refusal(field, entries)) when any map in a
    `message_class` body holds more than `limit` entries; a body that does not parse is left
    to the real parse to name."""
    skeleton = _skeleton(message_class.DESCRIPTOR)
    if skeleton is None:
        raise ValueError(f"{message_class.DESCRIPTOR.full_name} has no maps to bound")

    def check(body: bytes) -> None:
        try:
            parsed = skeleton.FromString(body)
        except Exception:  # DecodeError and kin
            return
        field, entries = _largest_map(parsed)
        if entries > limit:
            raise BodyRefused(refusal(field, entries))

    return check
