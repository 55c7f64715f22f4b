"""``taskserver.netguard.runner`` as earlier releases documented it; the module is
``taskserver.web.netguard``."""

from .web.netguard import GuardedRunner, runner

__all__ = ["GuardedRunner", "runner"]
