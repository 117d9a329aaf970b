"""The controller's dashboard pages (fleet, rollouts, drift), included by the app factory."""

from edgefleet.cloud_controller.dashboard.pages import router

__all__ = ["router"]
