"""`edgefleet demo` and the `Fleet` harness behind it: a whole fleet on this machine, offline.

- `spec`: what fleet to run (`FleetSpec`) and the example model's name and versions;
- `api`: a small client of the controller's HTTP API;
- `fleet`: `Fleet`, broker + controller + agents as child processes (also used by the end-to-end
  tests and the fleet benchmark);
- `agents`: an agent's ``agent.toml`` on the embedded defaults;
- `packages`: the example model packaged by the packager pipeline, a good and a bad version;
- `rollouts`: rollout bodies, when a rollout has settled, its outcome as ``--json`` prints it;
- `scenario`: the story the demo plays and prints; `command`: the `edgefleet demo` command.
"""
