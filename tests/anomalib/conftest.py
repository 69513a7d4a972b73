"""The anomalib tests run only in their own environment (scripts/anomalib_ci.sh builds it): where anomalib is not
installed (the main test run) this folder is not collected at all, so it costs the main suite nothing."""
import importlib.util

if importlib.util.find_spec("anomalib") is None:
    collect_ignore_glob = ["*.py"]
