"""The dprdm server: configuration, the transport-free service layer, and
the gRPC wiring (SPEC §6, §7). One job per module:

* ``config``: frozen, validated dataclasses loaded from TOML (``dprdm serve --config``).
* ``catalog``: loaded indexes, bundles, profiles and domain budgets; every startup check.
* ``api_types``: transport-free request/response types and request validation.
* ``query``: one query, reserve then compute (the privacy-critical order of steps).
* ``service`` / ``admin``: the service layer (async orchestration, pools, admin operations).
* ``generation``: the bounded generation pool (overload refused before any charge).
* ``errors`` / ``status``: domain errors and THE table mapping them to gRPC status codes.
* ``servicer`` / ``converters``: thin gRPC servicers and protobuf conversions.
* ``auth``: bearer tokens and roles (interceptor). ``metrics``: Prometheus (public values only;
  every series in ``METRICS.md``).
* ``access``: safe request decoding (undecodable bytes are INVALID_ARGUMENT) and access lines;
  ``logs``: text or JSON-lines logging, the startup summary, quiet model loading.
* ``app``: wiring, health, reflection, TLS (``dprdm serve`` is :mod:`dprdm.cli.serve`).
* ``adapters``: the real ``dprdm.index`` / ``dprdm.models`` objects behind the server's protocols.
* ``testing``: fakes and a server harness for tests. The ledger is :mod:`dprdm.ledger`; the wire
  types are :mod:`dprdm.proto`.
"""
