"""Route tables: each operation of the HTTP API declared once, served and documented from there.

A capability (contacts, deletion, webhooks, audit, ops) lists its operations in a
``ROUTES`` tuple of `Operation`::

    Operation("POST", "/v1/contacts", create_contact, "createContact", "Create a contact",
              tag="Contacts", scope="contacts:write", body=ContactCreate,
              answers=(Answer(201, Data[Contact], "The contact"),))

`register` adds the tables to an aiohttp app, and `service.openapi` builds the OpenAPI
document from the same tables, so a documented parameter the service does not take (or
the reverse) cannot happen: the query model that validates the query string is the one
the document describes, and so on for bodies, path ids and answers.

For every operation the wrapper, before the handler runs:

- checks the key's scope (403), when the operation has one;
- turns each ``{name}`` path segment into a UUID (a malformed one is 404: it cannot exist);
- validates the query string into ``query`` (unknown or repeated names are 400);
- reads and validates the JSON body into ``body`` (`service.http.read_json` bounds it).

The handler gets a `Call` and returns a `Reply` (or a bare pydantic model for the
operation's first answer). The reply's model must be the one declared for its status; it
is dumped through pydantic, so what leaves is what the document says. A handler may
return a prepared ``web.StreamResponse`` (a stream, a byte-exact idempotent replay).

A path that exists answers another method with 405 and ``Allow`` (and ``OPTIONS`` with
204 and ``Allow``), on every route.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import hdrs, web
from pydantic import BaseModel, ValidationError

from service import idempotency
from service.apimodels import NoQuery
from service.errors import MethodNotAllowed, NotFound, ValidationFailed
from service.http import DB_KEY, SETTINGS_KEY, read_json, require, validation_details
from service.keys import Principal
from service.limits import bad_text

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Answer:
    """One documented success answer: status, body model (None: no body), and headers."""

    status: int
    model: type[BaseModel] | None
    description: str
    headers: tuple[str, ...] = ()
    media_type: str = "application/json"


@dataclass(frozen=True)
class HeaderParam:
    """A request header an operation reads (documented as ``components.parameters.<key>``)."""

    key: str
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


IDEMPOTENCY_KEY = HeaderParam(
    "IdempotencyKey",
    idempotency.HEADER,
    "Makes the request safe to retry: the same key with the same body within 24 h gets the "
    "original answer again (with Idempotent-Replayed: true); with another body, or while the "
    "first request still runs, 409 idempotency_conflict. Recommended on every POST that "
    "creates or changes something.",
    {"type": "string", "minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH},
)


@dataclass
class Reply:
    """What a handler answers: the model for `status`, and extra headers."""

    model: BaseModel | None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    """One request as a handler sees it, already authorised and validated."""

    request: web.Request
    who: Principal | None
    path: dict[str, uuid.UUID]
    query: BaseModel
    body: BaseModel | None
    raw_body: Any

    @property
    def principal(self) -> Principal:
        assert self.who is not None, "only operations with a scope have a caller"
        return self.who

    @property
    def app(self) -> web.Application:
        return self.request.app

    def body_as(self, model: type[M]) -> M:
        """The validated body; `model` must be the operation's declared body model."""
        assert isinstance(self.body, model), f"the route table declares {type(self.body)}"
        return self.body

    def query_as(self, model: type[M]) -> M:
        """The validated query; `model` must be the operation's declared query model."""
        assert isinstance(self.query, model), f"the route table declares {type(self.query)}"
        return self.query


Handler = Callable[[Call], Awaitable[Reply | BaseModel | web.StreamResponse]]


@dataclass(frozen=True)
class Operation:
    """One operation of the API: method, path, handler, and everything the document says."""

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    scope: str | None
    answers: tuple[Answer, ...]
    body: type[BaseModel] | None = None
    query: type[BaseModel] = NoQuery
    headers: tuple[HeaderParam, ...] = ()
    errors: tuple[int, ...] = ()
    description: str | None = None

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{"))

    def answer(self, status: int) -> Answer:
        for answer in self.answers:
            if answer.status == status:
                return answer
        raise AssertionError(f"{self.operation_id} does not declare a {status} answer")


RouteTable = Sequence[Operation]


def query_dict(request: web.Request) -> dict[str, str]:
    """The query string as a dict; a repeated parameter is ambiguous and refused."""
    counts = Counter(name for name, _ in request.query.items())
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        raise ValidationFailed(
            "the query parameters are invalid",
            [{"field": name, "message": "given more than once"} for name in repeated],
        )
    for name, value in request.query.items():
        why = bad_text(name) or bad_text(value)
        if why is not None:
            raise ValidationFailed(
                "the query parameters are invalid", [{"field": name, "message": why}]
            )
    return dict(request.query)


# What a path parameter names, as every 404 of that resource says it ("no such …").
_NOUNS = {"endpoint_id": "webhook endpoint"}


def _noun(param: str) -> str:
    return _NOUNS.get(param) or param.removesuffix("_id").replace("_", " ")


def _known(
    details: list[dict[str, Any]], model: type[BaseModel], noun: str
) -> list[dict[str, Any]]:
    """An unknown name's detail lists the names the operation takes (a misspelt
    ``delete_member``, or ``?email=`` on a listing that takes only ``limit`` and ``cursor``),
    and the model's ``unknown_hint`` (where such a name is taken instead), if it has one."""
    names = ", ".join(f.alias or name for name, f in model.model_fields.items())
    hint = getattr(model, "unknown_hint", "")
    for detail in details:
        if detail.get("type") == "extra_forbidden":
            taken = f"unknown {noun}; the known ones: {names}" if names else f"no {noun} here"
            detail["message"] = f"{taken}{'; ' + hint if hint else ''}"
    return details


PLUS_AS_SPACE_HINT = "in a query string an unencoded '+' arrives as a space: send it as %2B"


def _plus_hints(
    details: list[dict[str, Any]], model: type[BaseModel], params: dict[str, str]
) -> list[dict[str, Any]]:
    """Add to a refused query parameter that has a space the advice to send '+' as %2B,
    where the '+' it may have been is taken (``email=ada+crm@…`` arrives as "ada crm@…",
    an offset ``+02:00`` as " 02:00"). The advice belongs here, where the value is known to
    come from a query string (form decoding makes '+' a space): the same value in a JSON
    body was sent as it is, and its validator's plain reason is the whole story."""
    for detail in details:
        name = detail["field"]
        value = params.get(name)
        if value is None or " " not in value:
            continue
        try:
            model.model_validate({**params, name: value.replace(" ", "+")})
        except ValidationError as exc:
            if any(d["field"] == name for d in validation_details(exc)):
                continue
        detail["message"] = f"{detail['message']}; {PLUS_AS_SPACE_HINT}"
    return details


async def _refuse_a_body(request: web.Request) -> None:
    """An operation that takes no body refuses one it would ignore (``{"foo": 1}`` on
    ``…/test`` passed silently, while every route with a body refuses unknown fields);
    nothing, or an empty JSON object, is taken as no body."""
    raw = await read_json(request) if (await request.read()).strip() else None
    if raw not in (None, {}):
        raise ValidationFailed(
            "this operation takes no request body",
            [{"field": "body", "message": "send no body (or {})"}],
        )


def dump(model: BaseModel) -> bytes:
    """A response model as the API's JSON: compact UTF-8, only the fields that were set."""
    return model.model_dump_json(exclude_unset=True).encode("utf-8")


def _wrap(op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        who = require(request, op.scope) if op.scope is not None else None
        path: dict[str, uuid.UUID] = {}
        for name in op.path_params:
            try:
                path[name] = uuid.UUID(request.match_info[name])
            except ValueError:
                raise NotFound(f"no such {_noun(name)}") from None
        params = query_dict(request)
        try:
            query = op.query.model_validate(params)
        except ValidationError as exc:
            details = _known(validation_details(exc), op.query, "parameter")
            raise ValidationFailed(
                "the query parameters are invalid", _plus_hints(details, op.query, params)
            ) from None
        body: BaseModel | None = None
        raw: Any = None
        if op.body is None and request.method != "GET" and request.can_read_body:
            await _refuse_a_body(request)
        if op.body is not None:
            raw = await read_json(request)
            try:
                # Strict JSON: a boolean is true or false and a count is an integer, as the
                # document says ("false", "no" or 0 was read as false: a real deletion for a
                # client that sent dry_run as a string). Strings still carry UUIDs and times.
                body = op.body.model_validate_json(await request.read(), strict=True)
            except ValidationError as exc:
                raise ValidationFailed(
                    "the request body is invalid", _known(validation_details(exc), op.body, "field")
                ) from None
        call = Call(request, who, path, query, body, raw)
        key = idempotency.header_key(request.headers) if replays(op) else None
        if key is None or who is None:
            return await _answer(op, call)
        return await _once(op, call, who.workspace_id, key)

    handler.__name__ = op.operation_id
    return handler


def replays(op: Operation) -> bool:
    """Whether `Idempotency-Key` on this operation replays its first answer through
    `_once`: every POST that changes something (its scope is not a ``:read`` one: a query
    sent as POST has nothing to protect, and a replayed page would be stale), except those
    that keep the key in their own transaction (they declare the header: the deletions)."""
    own = any(h.name == idempotency.HEADER for h in op.headers)
    writes = op.scope is not None and not op.scope.endswith(":read")
    return op.method == hdrs.METH_POST and writes and not own


async def _once(op: Operation, call: Call, workspace_id: uuid.UUID, key: str) -> web.Response:
    """Answer a request under its Idempotency-Key, as Stripe does on every POST: the same key
    and body within the replay window (24 h) get the first answer again, byte for byte,
    with ``Idempotent-Replayed: true``; another body, or the first still running, 409
    ``idempotency_conflict`` (service.idempotency). A request that fails (an error answer,
    an outage) leaves no answer behind: its retry runs. The answer is stored in the
    handler's own transaction (``one_transaction``: its ``db.begin()`` blocks join it as
    savepoints), so the change and its key commit together: a process that dies before
    the commit leaves neither, and the retry runs the change once."""
    request = call.request
    db, settings = request.app[DB_KEY], request.app[SETTINGS_KEY]
    print_ = idempotency.fingerprint(request.method, request.path, call.raw_body)

    async def work(_: idempotency.Claim) -> idempotency.StoredResponse:
        response = await _answer(op, call)
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        kept = {
            h: response.headers[h] for h in idempotency.REPLAYED_HEADERS if h in response.headers
        }
        subject = _contact_shown(request, response.body)
        return idempotency.StoredResponse(response.status, kept, response.body, subject)

    answer, replayed = await idempotency.once(
        db,
        workspace_id,
        key,
        print_,
        settings.idempotency_ttl_s,
        work,
        one_transaction=True,
        failpoint=settings.failpoint,
    )
    return idempotency.response(answer, replayed)


def _contact_shown(request: web.Request, body: bytes) -> uuid.UUID | None:
    """The contact a kept answer shows, so that deleting it erases the answer: the
    contact a path names (``/v1/contacts/{contact_id}/…``), else the contact an answer
    carries (``data.contact_id``, or ``data.id`` of a contact: it has an ``email``)."""
    named = request.match_info.get("contact_id")
    try:
        if named is not None:
            return uuid.UUID(named)
        data = orjson.loads(body).get("data") if body else None
        if isinstance(data, dict):
            if isinstance(data.get("contact_id"), str):
                return uuid.UUID(data["contact_id"])
            if "email" in data and isinstance(data.get("id"), str):
                return uuid.UUID(data["id"])
    except (ValueError, AttributeError):  # not JSON, or not an id: shows no contact
        return None
    return None


async def _answer(op: Operation, call: Call) -> web.StreamResponse:
    """Run the operation's handler and turn its result into the response the table says."""
    result = await op.handler(call)
    if isinstance(result, web.StreamResponse):
        return result
    reply = result if isinstance(result, Reply) else Reply(result, op.answers[0].status)
    answer = op.answer(reply.status)
    if answer.model is None:
        assert reply.model is None, f"{op.operation_id} {reply.status} has no body"
        return web.Response(status=reply.status, headers=reply.headers)
    assert type(reply.model) is answer.model, (
        f"{op.operation_id} answered {type(reply.model).__name__} for {reply.status}, "
        f"the table says {answer.model.__name__}"
    )
    return web.Response(
        status=reply.status,
        body=dump(reply.model),
        headers=reply.headers,
        content_type=answer.media_type,
    )


def _not_allowed(methods: Iterable[str]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A path's catch-all: 405 with Allow for other methods, 204 with Allow for OPTIONS."""
    allowed = sorted(set(methods) | {hdrs.METH_OPTIONS})
    allow = ",".join(allowed)

    async def handler(request: web.Request) -> web.Response:
        if request.method == hdrs.METH_OPTIONS:
            return web.Response(status=204, headers={"Allow": allow})
        raise MethodNotAllowed(
            f"method {request.method} is not allowed here",
            {"allowed_methods": allowed},
            headers={"Allow": allow},
        )

    return handler


def register(app: web.Application, tables: Iterable[RouteTable]) -> None:
    """Add every operation of the tables to the app, plus each path's 405 catch-all."""
    by_path: dict[str, list[Operation]] = {}
    for table in tables:
        for op in table:
            by_path.setdefault(op.path, []).append(op)
    for path, ops in by_path.items():
        methods = [op.method for op in ops]
        duplicated = [m for m, n in Counter(methods).items() if n > 1]
        assert not duplicated, f"{path} is declared twice for {duplicated}"
        resource = app.router.add_resource(path)
        for op in ops:
            resource.add_route(op.method, _wrap(op))
        allowed = set(methods)
        if hdrs.METH_GET in allowed:
            allowed.add(hdrs.METH_HEAD)
            get = next(op for op in ops if op.method == hdrs.METH_GET)
            resource.add_route(hdrs.METH_HEAD, _wrap(get))
        resource.add_route(hdrs.METH_ANY, _not_allowed(allowed))


def operations(tables: Iterable[RouteTable]) -> list[Operation]:
    """Every operation of the tables, in order."""
    return [op for table in tables for op in table]
