from instances.management.actions import SpawnCommand as Command

__all__ = ["Command"]
