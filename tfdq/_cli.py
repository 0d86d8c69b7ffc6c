"""What the two commands (``tfdq-train``, ``tfdq-export``) share: running an absl ``main``."""

import sys


def run_absl_main(main, flag_module: str) -> None:
    """``absl.app.run(main)`` with the flags of ``flag_module`` listed by ``--help``.

    absl lists the flags of the module that runs as ``__main__``; a console script's
    ``__main__`` is a wrapper that pip writes, which defines none, so the command's
    own flags are declared key flags of that wrapper here.
    """
    from absl import app, flags  # noqa: PLC0415

    for flag in flags.FLAGS.get_flags_for_module(flag_module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)
