# Images for the controller and the agent, built from this repository with pip alone, so the
# image build exercises the same install steps as the tests (`pip install .[controller]` /
# `.[agent]`). Build one with:  docker build --target controller -t edgefleet-controller .
#                               docker build --target agent -t edgefleet-agent .
# Every setting is an environment variable (EDGEFLEET_CONTROLLER_* / EDGEFLEET_AGENT_*, see
# docs/controller.md and docs/agent.md): no CMD flag overrides them. deploy/compose.yaml runs
# both with PostgreSQL and Mosquitto (TLS).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
# edgefleet/agent, /packager, /cloud_controller and /hardware_profiles link to the folders below:
# the image installs the one import name `edgefleet`.
COPY edgefleet ./edgefleet
COPY packager ./packager
COPY agent ./agent
COPY cloud_controller ./cloud_controller
COPY hardware_profiles ./hardware_profiles
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/edgefleet edgefleet \
    && mkdir -p /var/lib/edgefleet && chown edgefleet:edgefleet /var/lib/edgefleet

FROM base AS controller
RUN pip install '.[controller]' && rm -rf /src
USER edgefleet
WORKDIR /var/lib/edgefleet
# The database: EDGEFLEET_CONTROLLER_DB, or the controller.toml `edgefleet controller init`
# writes in the data directory, else SQLite there.
ENV EDGEFLEET_CONTROLLER_DATA_DIR=/var/lib/edgefleet \
    EDGEFLEET_CONTROLLER_HOST=0.0.0.0 \
    EDGEFLEET_CONTROLLER_PORT=8400
EXPOSE 8400
VOLUME ["/var/lib/edgefleet"]
ENTRYPOINT ["edgefleet", "controller"]
CMD ["serve"]

FROM base AS agent
# The agent image stays small: no quantization stack, no torch.
RUN pip install '.[agent]' && rm -rf /src
USER edgefleet
WORKDIR /var/lib/edgefleet
# In a container the inference API listens on every interface (the port is published);
# agent.toml comes from `edgefleet agent enroll ... /var/lib/edgefleet` on the volume.
ENV EDGEFLEET_AGENT_HTTP_HOST=0.0.0.0 \
    EDGEFLEET_AGENT_HTTP_PORT=8080
EXPOSE 8080
VOLUME ["/var/lib/edgefleet"]
ENTRYPOINT ["edgefleet", "agent"]
CMD ["run", "--config", "/var/lib/edgefleet/agent.toml"]
