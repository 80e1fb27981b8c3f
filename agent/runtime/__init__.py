"""The asyncio shell: the MQTT adapter and transport, control socket, collectors, daemon."""
