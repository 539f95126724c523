"""python -m ccl_sglang.launch_server <the arguments of python -m sglang.launch_server>

SGLang's server with ccl_sglang enabled in every process. SGLang starts its workers with
``spawn``, and a spawned process re-imports the parent's ``__main__`` module, which is this
one: the module-level ``autoload()`` below enables the hook there before SGLang builds its
process groups (``CCL_SGLANG=1`` is set here and inherited).

The ``__main__`` block does what ``sglang/launch_server.py`` (0.5.23) does under its own
``__main__``: load SGLang's plugins, parse the arguments, run the server, kill the process
tree on the way out.
"""

import os
import sys

import ccl_sglang

os.environ.setdefault(ccl_sglang.ENV, "1")
ccl_sglang.autoload()


def main(argv=None) -> None:
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
