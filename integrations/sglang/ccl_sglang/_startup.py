"""Imported by the ``ccl_sglang-autoload.pth`` startup hook (``python -m ccl_sglang install-pth``)
when ``CCL_SGLANG`` is on: enables the hook in every Python process of the environment,
including the workers SGLang spawns. The .pth line checks the variable before importing this,
so with ``CCL_SGLANG`` unset the hook costs one environment lookup per interpreter start."""

import ccl_sglang

ccl_sglang.autoload()
