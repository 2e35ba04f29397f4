from instances.management.actions import StopCommand as Command

__all__ = ["Command"]
