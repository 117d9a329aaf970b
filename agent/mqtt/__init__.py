"""The agent's MQTT side: the link (`link`), signed desired state (`desired`, planned by the pure
`reconcile`), outbox-to-broker delivery (`delivery`), reports built from agent facts
(`reports`) and the link's persisted state (`state`)."""
