"""The `ten` console script: a client of the REST API, on the Python standard library only.

It runs on operators' laptops, so nothing here may import Django or the server's packages
(instances.ids is plain Python and shared on purpose: one rule for names).
"""

from __future__ import annotations

from instances.cli.app import main

__all__ = ["main"]
