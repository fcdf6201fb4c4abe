"""``/v1/revocations``: hand an agent the CA's revocation list, and read back the one in force.

``PUT`` takes the list as ``meshd ca revoke`` writes it (PEM) or as DER, in
the raw body, whatever the content type.  It is verified here, against the
CA certificates the agent trusts, before the agent sees it; the agent then
decides whether it replaces the list it holds (``meshd.revocation.accept``).
A write like any other, so an API token, when the agent has one, guards it.

Answers: 200 ``{"number": N, "revoked": count}`` with the list now in force;
400 for a list that is not one, or not the mesh CA's; 409 for a list that may
not replace the one held (nothing changed).  ``GET`` answers
``{"number": N, "revoked": ["hex serial", ...]}``, number 0 when there is none.
"""

from __future__ import annotations

from datetime import UTC, datetime

from meshd.agent.interface import AgentAPI
from meshd.api.http import Request, Response, json_response
from meshd.api.routes import Application
from meshd.api.validation import ApiError
from meshd.revocation import StaleRevocationList, verify_revocation_list
from meshd.wire import Rejection

__all__ = ["add_revocation_routes"]


class _RevocationHandlers:
    def __init__(self, agent: AgentAPI) -> None:
        self.agent = agent

    async def put(self, request: Request) -> Response:
        # Capped by the application's client_max_size before this runs.
        body = await request.read()
        if not body.strip():
            raise ApiError(
                400, "request body is empty; send the revocation list that `meshd ca revoke` wrote"
            )
        agent = self.agent
        got = verify_revocation_list(body, agent.ca_certs, now=datetime.now(UTC))
        if isinstance(got, Rejection):
            agent.metrics.rejected.labels(reason=got.reason).inc()
            raise ApiError(400, f"the revocation list is refused: {got.detail}")
        try:
            held = await agent.put_revocations(got)
        except StaleRevocationList as exc:
            agent.metrics.rejected.labels(reason=f"crl-{exc.verdict}").inc()
            raise ApiError(409, str(exc)) from None
        return json_response({"number": held.number, "revoked": len(held.serials)})

    async def get(self, request: Request) -> Response:
        held = self.agent.revocations()
        if held is None:
            return json_response({"number": 0, "revoked": []})
        return json_response(held.to_json())


def add_revocation_routes(app: Application, agent: AgentAPI) -> None:
    """Add ``PUT`` and ``GET /v1/revocations`` to the local API ``app``.

    Errors are raised as ApiError and answered by the application's error
    middleware, like every native route's.
    """
    h = _RevocationHandlers(agent)
    app.router.add_put("/v1/revocations", h.put)
    app.router.add_get("/v1/revocations", h.get)
