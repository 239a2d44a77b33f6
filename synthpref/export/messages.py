"""Arrow types the export formats share: a message list as TRL's conversational formats store it."""

from __future__ import annotations

import pyarrow as pa

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
