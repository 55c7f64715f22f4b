"""``GET /openapi.json``: the document matches the router exactly and is served open."""

from __future__ import annotations

import pytest
from aiohttp import web

from taskserver import Settings, TaskServer, attach
from taskserver.web.openapi import document, operations

from .conftest import ClientFactory

TOKEN = "t0ken-for-the-openapi-tests-0123456789"


def _routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }


@pytest.mark.parametrize("subscriptions", [False, True])
@pytest.mark.parametrize("prefix", ["", "/jobs"])
def test_every_route_is_documented_and_nothing_else(
    settings: Settings, subscriptions: bool, prefix: str
) -> None:
    s = Settings(db=settings.db, task_workers=0, mercure_subscriptions=subscriptions)
    app = web.Application()
    attach(app, TaskServer(s), prefix=prefix)
    documented = {
        (method.upper(), path)
        for path, item in document(s, prefix)["paths"].items()
        for method in item
    }
    # The dashboard's page and files are HTML, not API: the document leaves them out.
    api_routes = {r for r in _routes(app) if not r[1].startswith(s.dashboard_path)}
    assert documented == api_routes
    assert len(operations(s)) == len(documented)


async def test_served_open_even_when_tokens_are_required(make_client: ClientFactory) -> None:
    client = await make_client(api_token=TOKEN)
    assert (await client.get("/tasks")).status == 401
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    doc = await response.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["paths"]["/tasks"]["post"]["security"][0] == {"bearer": ["enqueue"]}
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []


def test_the_options_schema_names_every_option() -> None:
    from taskserver.runtime.options import OPTIONS

    props = document(Settings())["components"]["schemas"]["NewTask"]["properties"]
    assert set(props) == OPTIONS | {"data"}


def test_the_documents_limits_are_the_apis() -> None:
    import inspect

    from taskserver.web import api, http

    defaults = inspect.signature(operations).parameters
    assert defaults["max_page"].default == http.MAX_PAGE
    assert defaults["max_wait"].default == api.MAX_WAIT
    assert defaults["max_batch"].default == api.MAX_BATCH
