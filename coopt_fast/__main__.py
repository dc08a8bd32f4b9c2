"""`python -m coopt_fast ...`, the form torchrun starts on every rank."""
import os
import sys

from coopt_fast.cli import main

if "MASTER_ADDR" not in os.environ:  # not under torchrun
    main()
else:
    # A torchrun rank leaves with os._exit once its command has finished (files closed and
    # published, output flushed), skipping the interpreter's and C++ static teardown. Seen under
    # load, about once in 50 two-rank runs: rank 1 aborting ("terminate called without an active
    # exception", SIGABRT) after rank 0 had printed a successful train's summary, so torchrun
    # reported the run failed. Not pinned down whether the abort was in that teardown or still in
    # destroy_process_group; this removes the teardown. Every file this project writes is closed
    # explicitly (and survives kill -9), so nothing is lost by skipping it.
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
