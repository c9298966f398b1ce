#!/usr/bin/env python3
"""
Standalone in-memory Kubernetes-like API server on top of PyPI `kmock` 0.8.

    python3 kube-api.py PORT        # PORT=0 picks a free port
    -> prints "READY http://127.0.0.1:PORT" on stdout when listening

Base: kmock.KubernetesEmulator (stateful create/get/list/watch/patch/delete)
served by kmock.Server (aiohttp RawTestServer) on 127.0.0.1:PORT, plain HTTP.
All builtin resources (v1 pods/namespaces/serviceaccounts, batch/v1 jobs, ...)
are declared for discovery via kmock's bundled K3s resource list.

Added on top of kmock (kmock 0.8 lacks these):
  * /api/v1/namespaces[/{name}[/status|/finalize]] URL parsing (kmock crashes with 500)
  * metadata.resourceVersion (global counter), uid, creationTimestamp, namespace,
    generateName; pods get status.phase=Pending, namespaces phase=Active on create
  * labelSelector / fieldSelector on list & watch; watch ?resourceVersion=N
    skips unchanged objects in the initial replay; watch ?timeoutSeconds=N
  * PUT (replace) of objects and of .../status
  * /api with serverAddressByClientCIDRs (required by k8s-openapi's APIVersions)
  * k8s-style Status reasons (NotFound / AlreadyExists) instead of kmock's prose
  * GET .../pods/{name}/log[?follow=true&tailLines=N]  (text fed by the test)
Test-control side endpoints (non-Kubernetes paths):
  POST /_test/logs/{ns}/{pod}         append request body to the pod's log
  PUT  /_test/logs/{ns}/{pod}         replace the pod's log
  POST /_test/logs/{ns}/{pod}/close   end ?follow=true streams for that pod
  POST /_test/reset                   forget all objects and logs
Pod status: use the normal API, e.g. PATCH /api/v1/namespaces/NS/pods/NAME/status
  (merge-patch body {"status": {...}}) -> watchers get a MODIFIED event.
  Follow-mode log streams also end when the pod's phase is Succeeded/Failed or
  the pod is deleted.
"""
import asyncio
import copy
import datetime
import json
import os
import re
import signal
import sys
import uuid
from typing import Any

import aiohttp.web
import attrs

import kmock
from kmock._internal import parsing

PODS = kmock.resource('v1/pods')
NAMESPACES = kmock.resource('v1/namespaces')


# ---- workaround: kmock 0.8 parse_path() fails on /api/v1/namespaces (ValueError -> HTTP 500)
# ---- and treats /api/v1/namespaces/foo as "namespace foo, no resource".
_orig_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip('/').split('/')
    if len(parts) >= 3 and parts[0] == 'api' and parts[2] == 'namespaces':
        rest = parts[3:]
        if len(rest) <= 1 or (len(rest) == 2 and rest[1] in ('status', 'finalize')):
            return parsing.ParsedPath(group='', version=parts[1], plural='namespaces',
                                      name=rest[0] if rest else None,
                                      subresource=rest[1] if len(rest) == 2 else None)
    return _orig_parse_path(path)


parsing.parse_path = _parse_path  # rendering.Request._parse() calls parsing.parse_path()


# ---- selectors -------------------------------------------------------------------------------
def _split_terms(sel: str) -> list[str]:
    terms, depth, cur = [], 0, ''
    for ch in sel:
        if ch == '(':
            depth += 1
        elif ch == ')':
            depth -= 1
        if ch == ',' and depth == 0:
            terms.append(cur.strip()); cur = ''
        else:
            cur += ch
    if cur.strip():
        terms.append(cur.strip())
    return terms


def _labels_match(labels: dict[str, str], sel: str | None) -> bool:
    for t in _split_terms(sel or ''):
        if m := re.fullmatch(r'(\S+)\s+(in|notin)\s+\((.*)\)', t):
            key, op, vals = m[1], m[2], {v.strip() for v in m[3].split(',')}
            ok = (key in labels and labels[key] in vals) if op == 'in' else (labels.get(key) not in vals)
        elif '!=' in t:
            k, v = (s.strip() for s in t.split('!=', 1)); ok = labels.get(k) != v
        elif '=' in t:
            k, v = (s.strip() for s in re.split(r'==?', t, maxsplit=1)); ok = labels.get(k) == v
        elif t.startswith('!'):
            ok = t[1:].strip() not in labels
        else:
            ok = t in labels
        if not ok:
            return False
    return True


def _fields_match(obj: dict[str, Any], sel: str | None) -> bool:
    for t in _split_terms(sel or ''):
        neg = '!=' in t
        k, v = (s.strip() for s in (t.split('!=', 1) if neg else re.split(r'==?', t, maxsplit=1)))
        cur: Any = obj
        for part in k.split('.'):
            cur = cur.get(part) if isinstance(cur, dict) else None
        val = '' if cur is None else str(cur)
        if (val == v) == neg:
            return False
    return True


def _selected(obj: dict[str, Any], params: dict[str, str]) -> bool:
    labels = (obj.get('metadata') or {}).get('labels') or {}
    return _labels_match(labels, params.get('labelSelector')) and _fields_match(obj, params.get('fieldSelector'))


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int((obj.get('metadata') or {}).get('resourceVersion') or 0)
    except ValueError:
        return 0


# ---- the emulator ----------------------------------------------------------------------------
@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _rv_counter: int = attrs.field(default=0, init=False)
    _logs: dict = attrs.field(factory=dict, init=False)          # (ns, pod) -> str
    _logs_closed: set = attrs.field(factory=set, init=False)      # {(ns, pod)}
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)

    def _next_rv(self) -> str:
        self._rv_counter += 1
        return str(self._rv_counter)

    def _live(self, key) -> dict | None:
        if key in self.objects and not self.objects[key].deleted:
            return self.objects[key].raw
        return None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, request):
        if request.url.path.startswith('/_test/'):
            return await self._serve_test(request)
        if request.resource == PODS and request.subresource == 'log' and request.method == 'GET' and request.params.get('watch') != 'true':
            return await self._serve_log(request)
        if request.method == 'PUT' and request.resource is not None and request.name:
            return await self._serve_put(request)

        # Stamp metadata into the request body BEFORE kmock stores it (no awaits: atomic).
        act = request.action
        if act == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault('metadata', {})
            if not meta.get('name') and meta.get('generateName'):
                meta['name'] = meta['generateName'] + uuid.uuid4().hex[:5]
            if request.namespace:
                meta['namespace'] = request.namespace
            key = (request.resource, request.namespace or meta.get('namespace'), meta.get('name'))
            if self._live(key) is None:  # else kmock answers 409
                meta['uid'] = str(uuid.uuid4())
                meta['creationTimestamp'] = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')
                meta['resourceVersion'] = self._next_rv()
                meta.setdefault('generation', 1)
                if request.resource == PODS:
                    request.data.setdefault('status', {}).setdefault('phase', 'Pending')
                elif request.resource == NAMESPACES:
                    request.data.setdefault('status', {}).setdefault('phase', 'Active')
        elif act == kmock.action.UPDATE and request.name:
            if isinstance(request.data, dict):
                request.data.setdefault('metadata', {})
                if isinstance(request.data['metadata'], dict):
                    request.data['metadata']['resourceVersion'] = self._next_rv()
            elif isinstance(request.data, list):  # JSON patch
                request.data.append({'op': 'add', 'path': '/metadata/resourceVersion', 'value': self._next_rv()})
        elif act == kmock.action.DELETE and request.name:
            key = (request.resource, request.namespace, request.name)
            if self._live(key) is not None:  # bump rv so the DELETED event carries a new rv
                self.objects[key].patch({'metadata': {'resourceVersion': self._next_rv()}})
        try:
            return await super()._handle(request)
        finally:
            if act in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
                await self._notify()

    async def _render_error(self, exc):
        resp = await super()._render_error(exc)
        reasons = {404: 'NotFound', 409: 'AlreadyExists', 400: 'BadRequest', 500: 'InternalError'}
        if isinstance(resp, aiohttp.web.Response) and resp.status in reasons and resp.body:
            data = json.loads(resp.body)
            data['reason'] = reasons[resp.status]
            data['details'] = {} if resp.status != 500 else data.get('details', {})
            return aiohttp.web.json_response(data, status=resp.status)
        return resp

    async def _serve_api(self, request):  # k8s-openapi's APIVersions requires serverAddressByClientCIDRs
        return {'apiVersion': 'v1', 'kind': 'APIVersions', 'versions': ['v1'],
                'serverAddressByClientCIDRs': [{'clientCIDR': '0.0.0.0/0', 'serverAddress': request.url.host + ':' + str(request.url.port)}]}

    # ---- list / watch with selectors & resourceVersion --------------------------------------
    def _list_meta(self, request) -> dict[str, Any]:
        res = request.resource
        kind = self.resources[res].kind if res in self.resources else None
        return {'apiVersion': f'{res.group}/{res.version}' if res.group else res.version,
                'kind': f'{kind or "Object"}List'}

    async def _serve_list(self, request):
        result = await super()._serve_list(request)  # raises 404 for undeclared resources
        items = [o for o in result['items'] if _selected(o, request.params)]
        return {**self._list_meta(request), 'metadata': {'resourceVersion': str(self._rv_counter)}, 'items': items}

    async def _serve_watch(self, request):
        yield b''  # send headers now (kmock's convention for streams)
        params = request.params
        since = params.get('resourceVersion') or '0'
        since_rv = int(since) if since.isdigit() else 0
        timeout = float(params.get('timeoutSeconds') or 0) or None
        deadline = asyncio.get_running_loop().time() + timeout if timeout else None
        bus = self._buses[request.resource]

        def matches(obj: dict) -> bool:
            meta = obj.get('metadata') or {}
            return ((request.namespace is None or meta.get('namespace') == request.namespace)
                    and (request.name is None or meta.get('name') == request.name)
                    and _selected(obj, params))

        async with self._lock:  # snapshot + bus mark atomically: no lost events
            initial = [o.raw for (res, _, _), o in self.objects.items()
                       if res == request.resource and not o.deleted]
            marker = await bus.mark()
        try:
            for obj in initial:
                if matches(obj) and _rv(obj) > since_rv:
                    yield {'type': 'ADDED', 'object': obj}
            stream = aiter(bus.stream(since=marker))
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await anext(stream)
                except (TimeoutError, StopAsyncIteration):
                    return
                if matches(event.get('object') or {}):
                    yield event
        finally:
            await bus.unmark(marker)

    # ---- PUT (replace) -------------------------------------------------------------------------
    async def _serve_put(self, request):
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            old = self._live(key)
            if old is None:
                raise kmock.KubernetesObjectNotFoundError()
            body = request.data if isinstance(request.data, dict) else {}
            if request.subresource == 'status':
                new = copy.deepcopy(old); new['status'] = body.get('status')
            else:
                new = copy.deepcopy(body)
                if 'status' in old:
                    new['status'] = old['status']
            meta = new.setdefault('metadata', {})
            for k in ('uid', 'creationTimestamp', 'namespace', 'name', 'generation'):
                if k in old.get('metadata', {}):
                    meta[k] = old['metadata'][k]
            meta['resourceVersion'] = self._next_rv()
            self.objects[key].create(new)  # appends a full new version
            raw = self.objects[key].raw
            await self._buses[request.resource].put({'type': 'MODIFIED', 'object': raw})
        await self._notify()
        return aiohttp.web.json_response(raw)

    # ---- pod logs ------------------------------------------------------------------------------
    def _log_finished(self, ns: str, name: str) -> bool:
        pod = self._live((PODS, ns, name))
        phase = ((pod or {}).get('status') or {}).get('phase')
        return (ns, name) in self._logs_closed or pod is None or phase in ('Succeeded', 'Failed')

    async def _serve_log(self, request):
        ns, name = request.namespace, request.name
        if self._live((PODS, ns, name)) is None:
            raise kmock.KubernetesObjectNotFoundError(message=f'pods "{name}" not found')
        text = self._logs.get((ns, name), '')
        pos = len(text)
        if (tail := request.params.get('tailLines')) is not None:
            lines = text.splitlines(keepends=True)
            text = ''.join(lines[-int(tail):]) if int(tail) > 0 else ''
        if request.params.get('follow') != 'true':
            return aiohttp.web.Response(text=text, content_type='text/plain')
        resp = aiohttp.web.StreamResponse(headers={'Content-Type': 'text/plain'})
        await resp.prepare(request._raw_request)
        try:
            if text:
                await resp.write(text.encode())
            while True:
                async with self._changed:
                    await self._changed.wait_for(
                        lambda: len(self._logs.get((ns, name), '')) > pos or self._log_finished(ns, name))
                buf = self._logs.get((ns, name), '')
                if len(buf) > pos:
                    await resp.write(buf[pos:].encode()); pos = len(buf)
                elif self._log_finished(ns, name):
                    break
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    # ---- test-control endpoints ------------------------------------------------------------------
    async def _serve_test(self, request):
        parts = request.url.path.strip('/').split('/')
        if parts[1:2] == ['logs'] and len(parts) in (4, 5):
            ns, pod = parts[2], parts[3]
            if len(parts) == 5 and parts[4] == 'close' and request.method == 'POST':
                self._logs_closed.add((ns, pod))
            elif len(parts) == 4 and request.method == 'POST':
                self._logs[(ns, pod)] = self._logs.get((ns, pod), '') + request.text
            elif len(parts) == 4 and request.method == 'PUT':
                self._logs[(ns, pod)] = request.text
                self._logs_closed.discard((ns, pod))
            else:
                return aiohttp.web.Response(status=405)
            await self._notify()
            return aiohttp.web.json_response({'ok': True})
        if parts[1:] == ['reset'] and request.method == 'POST':
            async with self._lock:
                self.objects.clear()
            self._logs.clear(); self._logs_closed.clear()
            await self._notify()
            return aiohttp.web.json_response({'ok': True})
        return aiohttp.web.Response(status=404, text='unknown /_test endpoint\n')


async def main(port: int) -> None:
    emulator = Emulator()
    emulator.resources.load_bundled()  # discovery for all builtin K3s resources (v1, batch/v1, ...)
    async with emulator, kmock.Server(emulator, host='127.0.0.1', port=port) as server:
        print(f'READY http://127.0.0.1:{server.port}', flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        os._exit(0)  # state is in-memory; skip aiohttp's graceful shutdown (open watches would delay it)


if __name__ == '__main__':
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
