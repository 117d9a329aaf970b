"""edgefleet: signed ONNX model packages, staged rollouts over MQTT, and a crash-safe agent."""

__version__ = "0.1.0"
