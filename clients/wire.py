"""What the sync and asyncio clients share: errors with decoded ``google.rpc`` details, result
types, channel settings (address, token, TLS from flags or the environment) and the request
builders. See :mod:`dprdm.clients.client` for the clients themselves."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dprdm.proto.v1 import admin_pb2, dprdm_pb2, types_pb2

__all__ = [
    "DprdmError",
    "BudgetExhaustedError",
    "RetrieveResult",
    "GenerateResult",
    "ChannelSettings",
    "MAX_MESSAGE_BYTES",
]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class DprdmError(Exception):
    """A failed call: status ``code`` name, ``message``, ``reason`` (ErrorInfo) and decoded details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        details: Sequence[Any] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message, self.reason = code, message, reason
        self.metadata = dict(metadata or {})
        self.details = list(details)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> DprdmError:
        """Decode a ``grpc.RpcError`` (sync or aio) with its rich status."""
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        details: list[Any] = []
        reason, meta = "", {}
        status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
        for packed in status.details if status is not None else ():
            for kind in (
                error_details_pb2.ErrorInfo,
                error_details_pb2.QuotaFailure,
                error_details_pb2.BadRequest,
                error_details_pb2.RetryInfo,
                error_details_pb2.RequestInfo,
                error_details_pb2.ResourceInfo,
            ):
                if packed.Is(kind.DESCRIPTOR):
                    msg = kind()
                    packed.Unpack(msg)
                    details.append(msg)
                    if isinstance(msg, error_details_pb2.ErrorInfo):
                        reason, meta = msg.reason, dict(msg.metadata)
        klass = BudgetExhaustedError if code == grpc.StatusCode.RESOURCE_EXHAUSTED else cls
        return klass(code, message or "", reason, meta, details)


class BudgetExhaustedError(DprdmError):
    """RESOURCE_EXHAUSTED: the privacy budget (or the tenant's quota) does not admit the query."""


@dataclass(frozen=True)
class RetrieveResult:
    """The release (float64 vector) and its receipt."""

    embedding: npt.NDArray[np.float64]
    receipt: types_pb2.Receipt


@dataclass
class GenerateResult:
    """PNG images, the receipt, and the sampler seed used."""

    images: list[bytes] = field(default_factory=list)
    receipt: types_pb2.Receipt | None = None
    seed: int = 0


@dataclass(frozen=True)
class ChannelSettings:
    """Where and how to connect."""

    address: str
    token: str
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    @classmethod
    def from_env(
        cls, address: str | None = None, token: str | None = None, **tls: str | None
    ) -> ChannelSettings:
        """Fill unset fields from ``DPRDM_ADDRESS``, ``DPRDM_TOKEN``, ``DPRDM_CA_CERT``, ..."""
        env = os.environ
        return cls(
            address=address or env.get("DPRDM_ADDRESS", "127.0.0.1:50051"),
            token=token or env.get("DPRDM_TOKEN", ""),
            ca_cert=tls.get("ca_cert") or env.get("DPRDM_CA_CERT"),
            client_cert=tls.get("client_cert") or env.get("DPRDM_CLIENT_CERT"),
            client_key=tls.get("client_key") or env.get("DPRDM_CLIENT_KEY"),
            server_name=tls.get("server_name") or env.get("DPRDM_SERVER_NAME"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options (raised message limits, TLS name override, and a subchannel pool per
        channel: gRPC Python otherwise shares one connection per address per process, so every
        client of one process would reach the same worker of a ``--workers N`` server)."""
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return opts

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext."""
        if not self.ca_cert:
            return None
        key = Path(self.client_key).read_bytes() if self.client_key else None
        cert = Path(self.client_cert).read_bytes() if self.client_cert else None
        return grpc.ssl_channel_credentials(Path(self.ca_cert).read_bytes(), key, cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The bearer token."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _retrieve_request(
    index: str, prompt: str, profile: str, request_id: str | None
) -> dprdm_pb2.RetrieveRequest:
    return dprdm_pb2.RetrieveRequest(
        index=index, profile=profile, prompt=prompt, request_id=request_id or uuid.uuid4().hex
    )


def _generate_request(
    index: str,
    prompt: str,
    profile: str,
    request_id: str | None,
    num_images: int,
    steps: int,
    seed: int | None,
) -> dprdm_pb2.GenerateRequest:
    for name, value, bits in (("num_images", num_images, 32), ("steps", steps, 32), ("seed", seed, 64)):
        if value is not None and not (isinstance(value, int) and 0 <= value < 2**bits):
            raise ValueError(f"{name} must be an integer in [0, 2**{bits}); found {value!r}")
    req = dprdm_pb2.GenerateRequest(
        index=index,
        profile=profile,
        prompt=prompt,
        num_images=num_images,
        steps=steps,
        request_id=request_id or uuid.uuid4().hex,
    )
    if seed is not None:
        req.seed = seed
    return req


def _budget_request(index: str | None, domain: str | None) -> dprdm_pb2.GetBudgetRequest:
    return (
        dprdm_pb2.GetBudgetRequest(domain=domain) if domain else dprdm_pb2.GetBudgetRequest(index=index or "")
    )


def _create_budget_request(
    domain: str,
    epsilon: float,
    delta: float,
    profiles: Sequence[dict[str, float]],
    renyi_filter: bool,
    filter_order: float | None,
    quotas: dict[str, float] | None,
) -> admin_pb2.CreateBudgetRequest:
    return admin_pb2.CreateBudgetRequest(
        domain=domain,
        epsilon=epsilon,
        delta=delta,
        renyi_filter=renyi_filter,
        filter_order=filter_order or 0.0,
        tenant_quotas=quotas or {},
        profiles=[
            admin_pb2.ProfileParams(k=int(p["k"]), q=p["q"], sigma=p["sigma"], **{"lambda": p["lambda"]})
            for p in profiles
        ],
    )


def _fold(result: GenerateResult, event: dprdm_pb2.GenerateEvent) -> None:
    kind = event.WhichOneof("event")
    if kind == "image":
        result.images.append(event.image.png)
    elif kind == "retrieved":
        result.receipt = event.retrieved.receipt
    elif kind == "done":
        result.receipt, result.seed = event.done.receipt, event.done.seed


