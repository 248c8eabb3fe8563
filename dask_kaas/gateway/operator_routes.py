"""Operator routes (operator token only): weights, policy, caches, metrics."""

from __future__ import annotations

import math

from ..checks import WEIGHT_RANGE
from ..graph.errors import KaasError
from .errors import BadRequestError, NotFoundError
from .handlers import OPERATOR, BaseHandler, BodyHandler


class WeightHandler(BodyHandler):
    role = OPERATOR

    async def put(self, tenant: str) -> None:
        doc = self.json_body("the weight document")
        weight = doc.get("weight") if isinstance(doc, dict) else None
        lo, hi = WEIGHT_RANGE  # the range the scheduler accepts
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and lo <= weight <= hi):
            raise BadRequestError(f"body must be {{\"weight\": <number in {lo:g}..{hi:g}>}}")
        if tenant not in self.gw.tenants.tenants:
            raise NotFoundError(f"no tenant {tenant[:80]!r} in the tenants file")
        self.gw.weights[tenant] = float(weight)
        await self.gw.dispatcher.call(self.gw.client.kaas_set_weight, tenant, float(weight))
        self.reply({"tenant": tenant, "weight": float(weight)})


class PolicyHandler(BodyHandler):
    role = OPERATOR

    async def put(self) -> None:
        doc = self.json_body("the policy document")
        policy = doc.get("policy") if isinstance(doc, dict) else None
        if not isinstance(policy, str) or len(policy) > 64:
            raise BadRequestError("body must be {\"policy\": \"<name>\"}")
        try:
            name = await self.gw.dispatcher.call(self.gw.client.kaas_set_policy, policy)
        except (KaasError, ValueError, KeyError) as e:
            raise BadRequestError(f"cannot switch to policy {policy!r}: {e}") from None
        self.reply({"policy": name})


class ClearCachesHandler(BodyHandler):
    role = OPERATOR

    async def post(self) -> None:
        await self.gw.dispatcher.call(self.gw.client.kaas_clear_caches)
        self.set_status(204)
        self.finish()


class MetricsHandler(BaseHandler):
    role = OPERATOR

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gw.metrics.render())
