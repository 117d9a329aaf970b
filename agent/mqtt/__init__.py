"""The agent's MQTT side: reconciliation decisions, durable outbox, link state."""
