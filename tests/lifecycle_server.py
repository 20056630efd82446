"""``dprdm serve`` with the test fakes: the real CLI path (logging, signals, exit status) over the
``fake:`` indexes and ``hash-<dim>`` bundles of :mod:`dprdm.server.testing`.

Run by ``tests/test_server_lifecycle.py`` as ``python tests/lifecycle_server.py serve --config ...``
(the arguments are those of ``dprdm``).
"""

from __future__ import annotations

import sys

import dprdm.server.app as app
from dprdm.cli.main import main
from dprdm.server.testing import fake_loaders

if __name__ == "__main__":
    app.default_loaders = lambda checksum_cache=None, background=False: fake_loaders()  # the only difference from `dprdm serve`
    raise SystemExit(main(sys.argv[1:]))
