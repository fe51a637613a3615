"""Encoder autoscaling on inputs, not calls. Serve's default policy counts requests in flight,
but an encoder's requests are the router's coalesced batches, a few in flight whatever the load;
its inputs in flight follow the load (Little's law: arrival rate x time at the encoder). The
policy is Serve's default rule on that count, so `target_ongoing_requests` means inputs per
replica. In the serve config:

    autoscaling_config:
      target_ongoing_requests: 16
      policy: {policy_function: multimed.services.autoscaling:inputs_policy}

Serve imports it where the config is read and ships it to its controller by value; the
controller applies min/max replicas, the up/down delays and the scaling factors around it as for
its own policy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the controller passes it; importing ray.serve here would be heavy for nothing
    from ray.serve.config import AutoscalingContext

# The metric each encoder replica reports (Encoder.record_autoscaling_stats).
INPUTS_IN_FLIGHT = "inputs_in_flight"


def inputs_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """-> (replicas wanted, policy state): the inputs in flight at all RUNNING replicas, each
    averaged over `look_back_period_s`, over `target_ongoing_requests` inputs a replica. A
    replica that has not reported yet counts none."""
    if ctx.current_num_replicas == 0:  # Serve's own cold start decides (min_replicas 0)
        return ctx.target_num_replicas, {}
    inputs = sum(((ctx.aggregated_metrics or {}).get(INPUTS_IN_FLIGHT) or {}).values())
    return inputs / ctx.config.get_target_ongoing_requests(), {}
