"""FusionBench's entropy losses, each loaded from its own file: importing fusion_bench.method pulls in its whole
dependency list (datasets, ...), which the fixture and benchmark scripts do not need."""
import importlib.util
import os


def entropy_loss(method):
    """`fusion_bench/method/<method>/entropy_loss.py`'s entropy_loss: "we_moe" (WEMoE's) or "adamerging"."""
    import fusion_bench
    path = os.path.join(os.path.dirname(fusion_bench.__file__), "method", method, "entropy_loss.py")
    spec = importlib.util.spec_from_file_location(f"fusionbench_{method}_entropy_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.entropy_loss
