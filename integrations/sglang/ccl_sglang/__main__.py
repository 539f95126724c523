"""python -m ccl_sglang {install-pth,uninstall-pth,status}

install-pth    writes ``ccl_sglang-autoload.pth`` into this environment's site-packages: from
               then on every Python process of the environment (SGLang's spawned workers too)
               enables the hook when ``CCL_SGLANG=1``; with the variable unset it costs one
               environment lookup per interpreter start.
uninstall-pth  removes it.
status         says what this environment has: SGLang's version, the startup hook, the
               ``sglang.srt.plugins`` entry point, and whether CCL_SGLANG is on.
"""

import argparse
import os
import sys
import sysconfig

PTH_NAME = "ccl_sglang-autoload.pth"
PTH_LINE = (
    "import os; os.environ.get('CCL_SGLANG', '').strip().lower() in ('1', 'true', 'yes', 'on')"
    " and __import__('ccl_sglang._startup')\n"
)


def _site_dir(given: str | None) -> str:
    return given or sysconfig.get_paths()["purelib"]


def _entry_point() -> str | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="sglang.srt.plugins"):
        if ep.value.startswith("ccl_sglang"):
            return f"{ep.name} = {ep.value}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ccl_sglang", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("install-pth", "uninstall-pth"):
        s = sub.add_parser(name)
        s.add_argument("--site", help="site-packages directory (default: this interpreter's)")
    sub.add_parser("status")
    args = p.parse_args(argv)

    if args.cmd == "install-pth":
        path = os.path.join(_site_dir(args.site), PTH_NAME)
        with open(path, "w") as f:
            f.write(PTH_LINE)
        print(f"wrote {path}: CCL_SGLANG=1 now enables ccl_sglang in every process of {sys.prefix}")
        return 0
    if args.cmd == "uninstall-pth":
        path = os.path.join(_site_dir(args.site), PTH_NAME)
        if os.path.exists(path):
            os.remove(path)
            print(f"removed {path}")
        else:
            print(f"{path} does not exist")
        return 0

    import importlib.metadata as md

    import ccl_sglang

    try:
        sglang_version = md.version("sglang")
    except md.PackageNotFoundError:
        sglang_version = "not installed"
    pth = os.path.join(_site_dir(None), PTH_NAME)
    print(f"sglang                {sglang_version}")
    hook = f"installed: {pth}" if os.path.exists(pth) else "not installed"
    print(f"startup hook (.pth)   {hook}")
    print(f"sglang.srt.plugins    {_entry_point() or 'no ccl_sglang entry point declared'}")
    print(f"CCL_SGLANG            {os.environ.get('CCL_SGLANG', '(unset)')}"
          f" -> {'on' if ccl_sglang.env_enabled() else 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
