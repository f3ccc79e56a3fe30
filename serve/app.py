"""The Ray Serve application: ``serve run configs/serve.yaml`` (or ``serve deploy`` on a running cluster).

``configs/serve.yaml`` points its ``import_path`` here; the application's ``args`` (model_uri, batching, limits)
are the ``serve`` settings of the config system. All the logic lives in ``boneage.service`` and ``boneage.api``.
"""

from boneage.service import build

__all__ = ["build"]
