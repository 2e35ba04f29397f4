from instances.management.actions import RestartCommand as Command

__all__ = ["Command"]
