"""The client SDK (sync and asyncio) and file reading; imports neither torch nor ray."""

from multimed.client.channel import DEFAULT_URL
from multimed.client.sdk import AsyncMultiMedClient, MultiMedClient

__all__ = ["DEFAULT_URL", "AsyncMultiMedClient", "MultiMedClient"]
