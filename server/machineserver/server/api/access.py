"""AccessService: the caller's identity, API keys (admin), quota usage.

Which role each RPC needs is the auth hook's table (:mod:`.auth`); the servicer checks
only what depends on the request: another tenant's quota usage needs the admin role.
"""

from __future__ import annotations

from typing import Any

from grpc import aio

from machineserver.server.api import convert
from machineserver.server.api.base import Servicer
from machineserver.server.core import identity
from machineserver.server.core.apikeys import ApiKeyRecord, ApiKeyStore, check_tenant
from machineserver.server.core.errors import InvalidArgument, PermissionDenied, Unimplemented
from machineserver.server.core.identity import Identity, Role
from machineserver.v1 import access_pb2 as pb
from machineserver.v1 import access_pb2_grpc as pb_grpc

SERVICE = "/machineserver.v1.AccessService/"
MAX_TTL_SECONDS = 10 * 365 * 86400


def _role_values(roles: frozenset[Role]) -> list[pb.Role.ValueType]:
    return [pb.Role.ValueType(int(r)) for r in sorted(roles)]


def caller_message(who: Identity) -> pb.CallerIdentity:
    return pb.CallerIdentity(principal=who.principal, tenant=who.tenant, roles=_role_values(who.roles),
                             auth_method=pb.AuthMethod.ValueType(int(who.auth_method)))


def api_key_message(record: ApiKeyRecord) -> pb.ApiKey:
    msg = pb.ApiKey(name=record.name, display_name=record.display_name, principal=record.principal,
                    tenant=record.tenant, roles=_role_values(record.roles),
                    secret_prefix=record.secret_prefix, create_time=convert.timestamp(record.create_time),
                    created_by=record.created_by)
    if record.expire_time is not None:
        msg.expire_time.CopyFrom(convert.timestamp(record.expire_time))
    if record.revoke_time is not None:
        msg.revoke_time.CopyFrom(convert.timestamp(record.revoke_time))
    return msg


def _roles(values: list[int]) -> frozenset[Role]:
    roles = set()
    for value in values:
        if value not in Role._value2member_map_:
            raise InvalidArgument("roles", f"{value} is not a role (ROLE_VIEWER, ROLE_OPERATOR, ROLE_ADMIN)")
        roles.add(Role(value))
    if not roles:
        raise InvalidArgument("roles", "at least one role")
    return frozenset(roles)


class AccessServicer(Servicer, pb_grpc.AccessServiceServicer):
    @property
    def keys(self) -> ApiKeyStore:
        return self.engine.apikeys

    async def GetCallerIdentity(self, request: pb.GetCallerIdentityRequest,
                                context: aio.ServicerContext[Any, Any]) -> pb.GetCallerIdentityResponse:
        return pb.GetCallerIdentityResponse(identity=caller_message(identity.current()))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest,
                           context: aio.ServicerContext[Any, Any]) -> pb.CreateApiKeyResponse:
        roles = _roles(list(request.roles))
        check_tenant(request.tenant)
        ttl: float | None = None
        if request.HasField("ttl"):
            if request.ttl.seconds < 0 or request.ttl.nanos < 0 or not (request.ttl.seconds or request.ttl.nanos):
                raise InvalidArgument("ttl", "must be positive (leave it unset for a key that does not expire)")
            if request.ttl.seconds > MAX_TTL_SECONDS:
                raise InvalidArgument("ttl", f"at most {MAX_TTL_SECONDS} s (ten years)")
            ttl = request.ttl.ToTimedelta().total_seconds()
        record, secret = self.keys.create(request.display_name, request.tenant, roles, ttl_seconds=ttl,
                                          created_by=identity.current().principal)
        return pb.CreateApiKeyResponse(api_key=api_key_message(record), secret=secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest,
                          context: aio.ServicerContext[Any, Any]) -> pb.ListApiKeysResponse:
        page = self.keys.list(request.page_size, request.page_token, request.filter)
        return pb.ListApiKeysResponse(api_keys=[api_key_message(r) for r in page.items],
                                      next_page_token=page.next_page_token)

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest,
                           context: aio.ServicerContext[Any, Any]) -> pb.RevokeApiKeyResponse:
        if not request.name:
            raise InvalidArgument("name", "required (apiKeys/ID)")
        record = self.keys.revoke(request.name)
        return pb.RevokeApiKeyResponse(api_key=api_key_message(record))

    async def GetQuotaUsage(self, request: pb.GetQuotaUsageRequest,
                            context: aio.ServicerContext[Any, Any]) -> pb.GetQuotaUsageResponse:
        who = identity.current()
        tenant = request.tenant or who.tenant
        if tenant != who.tenant:
            check_tenant(tenant)
            if not who.is_admin:
                raise PermissionDenied(SERVICE + "GetQuotaUsage", "admin",
                                       f"another tenant's quota usage needs the admin role; {who.principal} "
                                       f"belongs to tenant {who.tenant}")
        quotas = getattr(self.engine, "quotas", None)
        if quotas is None:
            raise Unimplemented("quotas", "this server does not meter quotas")
        return pb.GetQuotaUsageResponse(tenant=tenant, quotas=[
            pb.QuotaUsage(limit=limit, used=used, maximum=maximum) for limit, used, maximum in quotas.usage(tenant)
        ])
