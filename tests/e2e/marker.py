"""A marker sent last on an agent's own connection, so a test can say what did not leave
without sleeping: whatever the agent handed over before the marker arrives before it.

MQTT keeps the order of one client's QoS 1 messages on one topic to each subscriber
(v5 §4.6), so the marker goes on ``up/crash``, the topic of the personal data these
tests hold back. Other kinds rest on the causal order as well: an item the broker has
acknowledged (an idle agent has nothing in flight) was queued for the cloud before
the marker was published, and the cloud's one connection delivers its queue in order.
"""

from __future__ import annotations

import json
import uuid

from agent.core.identity import up_topic
from simulator.cloud import Cloud, Received
from simulator.rig import Agent, until


async def before_marker(agent: Agent, cloud: Cloud) -> list[Received]:
    """Publish a marker on the agent's live connection and wait until the cloud has it;
    what arrived from the agent before it (the marker left out)."""
    assert agent.transport is not None
    conn = agent.transport._conn  # the live connection, behind everything handed over (test only)
    assert conn is not None, f"agent {agent.device_id} is not connected"
    msg_id = f"marker-{uuid.uuid4().hex}"
    conn.publish_nowait(up_topic(agent.device_id, "crash"), json.dumps({"msg_id": msg_id}).encode())
    conn.flush()
    await until(cloud, lambda: msg_id in {m.msg_id for m in cloud.of(agent.device_id)})
    ids = [m.msg_id for m in cloud.of(agent.device_id)]
    return cloud.of(agent.device_id)[: ids.index(msg_id)]
