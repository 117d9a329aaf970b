# Images for the controller and the agent, built from this repository with pip alone, so the
# image build exercises the same install steps as the tests (`pip install .[controller]` /
# `.[agent]`). Build one with:  docker build --target controller -t edgefleet-controller .
#                               docker build --target agent -t edgefleet-agent .
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
RUN useradd --system --uid 10001 --home /var/lib/edgefleet edgefleet

FROM base AS controller
RUN pip install '.[controller]' && rm -rf /src
USER edgefleet
WORKDIR /var/lib/edgefleet
EXPOSE 8080
VOLUME ["/var/lib/edgefleet"]
ENTRYPOINT ["edgefleet", "controller", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080", "--db", "sqlite:////var/lib/edgefleet/controller.db", "--packages", "/var/lib/edgefleet/packages"]

FROM base AS agent
# The agent image stays small: no quantization stack, no torch.
RUN pip install '.[agent]' && rm -rf /src
USER edgefleet
WORKDIR /var/lib/edgefleet
EXPOSE 8000
VOLUME ["/var/lib/edgefleet"]
ENTRYPOINT ["edgefleet", "agent", "run"]
CMD ["--config", "/var/lib/edgefleet/agent.toml"]
