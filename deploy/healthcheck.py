"""Container health probe: exit 0 iff the server's gRPC health service answers SERVING.

Usage: ``python healthcheck.py [HOST:PORT]`` (default ``$DPRDM_HEALTH_ADDRESS`` or
``127.0.0.1:50051``). Plaintext only: with ``[tls]`` configured, use ``grpc_health_probe -tls``.
Needs only ``grpcio`` and ``grpcio-health-checking`` (the ``server`` extra).
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    address = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DPRDM_HEALTH_ADDRESS", "127.0.0.1:50051")
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
