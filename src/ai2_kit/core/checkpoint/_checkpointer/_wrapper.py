"""The wrapper: ``CheckpointedFunction``, what ``apply_checkpoint`` returns, and how it travels.

One object per decorated function that looks like the function, runs its
calls against a checkpointer (sync, async, and plain functions returning
awaitables) and pickles with a description of its store (``StoreSpec``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import pickle
import time
import types
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple, Optional, overload

import cloudpickle  # at import, not lazily: a fork during a lazy import can deadlock a child

from .._errors import CheckpointError
from .._fingerprint import hit_digest
from .._keys import validate_key
from ._async import (
    _NOT_AWAITABLE,
    INLINE_MAX_BYTES,
    _busy,
    _inline_turn,
    _Lane,
    _offload,
    _Pending,
    _ready,
    _small,
    _submit,
)
from ._calls import (
    _FN_STATE,
    Key,
    _call_site,
    _check_policy,
    _fn_state,
    _lookup_qualname,
    _mark_coroutine_function,
    _resolve_key,
)
from ._dedup import Lease, _end_call, _Flight, _fresh, _log_wait, _save_and_end
from ._registry import registry

if TYPE_CHECKING:
    from ._policy import Checkpointer, StoreSpec

__all__ = ["CheckpointedFunction", "make_wrapper", "_rebuild_wrapper", "_wrap"]

logger = logging.getLogger("ai2_kit.core.checkpoint")


class _FnRef(NamedTuple):
    """A module-level function that the module holds only under our wrapper."""

    module: str
    qualname: str

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, CheckpointedFunction):
            return obj.__wrapped__
        return obj



def _rebuild_wrapper(payload: bytes, disable: bool, stale: Optional[str], spec: Optional[StoreSpec],
                     validated: bool = False) -> Any:
    # A wrapper with a validator sends it in the same payload (cloudpickle: a
    # lambda travels too); one without keeps the four-argument form.
    if validated:
        fn, key, validate = pickle.loads(payload)
    else:
        (fn, key), validate = pickle.loads(payload), None
    if isinstance(fn, _FnRef):
        fn = fn.resolve()
    return CheckpointedFunction(fn, key, disable, stale, spec=spec, received=True, validate=validate)


class CheckpointedFunction:
    """A function whose calls are checkpointed: what ``apply_checkpoint`` returns.

    It looks like the function it wraps (name, docstring, signature,
    ``inspect.iscoroutinefunction``) and works as a method. It pickles, for
    process pools and Dask, with the function, the key and a description of
    its store (``StoreSpec``); a worker receiving it opens that store once per
    process. A facade wrapper carries the default store of the moment it was
    sent (or "off" when none was set).
    """

    __wrapped__: Callable[..., Any]
    _ck_key: Key
    _ck_k: Optional[str]
    _ck_bound: Optional[Checkpointer]
    _ck_name: str
    # What most wrappers have: set on one only when it differs.
    _ck_disable: bool = False
    _ck_stale: Optional[str] = None
    _ck_default: Optional[Callable[[], Optional[Checkpointer]]] = None
    _ck_spec: Optional[StoreSpec] = None
    _ck_received: bool = False
    _ck_coro: bool = False
    _ck_validate: Optional[Callable[[Any], Any]] = None

    def __new__(
        cls,
        fn: Callable[..., Any],
        key: Key,
        disable: bool = False,
        stale: Optional[str] = None,
        *,
        ckpt: Optional[Checkpointer] = None,
        default: Optional[Callable[[], Optional[Checkpointer]]] = None,
        spec: Optional[StoreSpec] = None,
        received: bool = False,
        validate: Optional[Callable[[Any], Any]] = None,
    ) -> CheckpointedFunction:
        return _wrap(ckpt, default, key, fn, disable, stale, spec, received, cls, validate=validate)

    # -- looking like the function ------------------------------------------------
    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        return types.MethodType(self, obj)

    def __repr__(self) -> str:
        return f"<checkpointed {self._ck_name} key={self._ck_key!r}>"

    # -- travelling ------------------------------------------------------------------
    def _carried_spec(self) -> Optional[StoreSpec]:
        if self._ck_received or self._ck_disable:
            return self._ck_spec
        ckpt = self._ck_bound if self._ck_bound is not None else (
            self._ck_default() if self._ck_default is not None else None)
        if ckpt is None:
            return None
        if ckpt.spec is None:
            raise TypeError(f"cannot send {self!r} to another process: {ckpt!r} was made from a store "
                            "object that cannot be described; create the Checkpointer from a location")
        return ckpt.spec

    def __reduce__(self) -> tuple[Any, ...]:
        fn: Any = self.__wrapped__  # type: ignore[attr-defined]
        target = _lookup_qualname(fn)
        if (target is not fn and isinstance(target, CheckpointedFunction) and target.__wrapped__ is fn
                and fn.__module__ != "__main__"):
            # Decorated at module level: the module's name now means the wrapper,
            # so the plain function cannot be pickled by name; send the name, and
            # the receiver unwraps what it finds there. (A script's __main__ is
            # not the worker's: cloudpickle sends those functions by value.)
            fn = _FnRef(fn.__module__, fn.__qualname__)
        # cloudpickle for the function and the key: lambdas and local
        # functions travel too (module-level functions still go by name).
        if self._ck_validate is not None:
            payload = cloudpickle.dumps((fn, self._ck_key, self._ck_validate))
            return _rebuild_wrapper, (payload, self._ck_disable, self._ck_stale, self._carried_spec(), True)
        payload = cloudpickle.dumps((fn, self._ck_key))
        return _rebuild_wrapper, (payload, self._ck_disable, self._ck_stale, self._carried_spec())

    # -- which checkpointer a call uses --------------------------------------------------
    def _resolve(self) -> Optional[Checkpointer]:
        if self._ck_disable:
            return None
        if self._ck_bound is not None:
            return self._ck_bound
        if self._ck_received:
            return None if self._ck_spec is None else registry.get(self._ck_spec)
        return self._ck_default() if self._ck_default is not None else None

    def _acquire(self) -> Optional[Checkpointer]:
        """The checkpointer for a call, counted as in flight on it (None: just run)."""
        for _ in range(100):
            ckpt = self._resolve()
            if ckpt is None or ckpt._enter():
                return ckpt
            if self._ck_bound is not None:
                raise CheckpointError(f"{ckpt!r} is closed; create a new Checkpointer to go on")
        raise CheckpointError("the checkpoint store kept being switched while a call started")  # pragma: no cover

    # -- one call ----------------------------------------------------------------------------
    def _fields(self, site: str, started: float, awaitable: bool, fp: Optional[dict[str, Any]]) -> dict[str, Any]:
        out = {
            "fn_name": self._ck_name,
            "call_site": site,
            "duration": time.perf_counter() - started,
            "is_awaitable": awaitable,
        }
        if fp is not None:
            out["fingerprint"] = fp
            digest = getattr(fp, "digest", None)
            if digest is not None:
                out["fpd"] = digest  # what later hits compare first (see Store.lookup_fast)
        return out

    @overload
    def _prepare(self, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict,
                 limit: None = None) -> tuple[Any, ...]: ...

    @overload
    def _prepare(self, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict,
                 limit: int) -> Optional[tuple[Any, ...]]: ...

    def _prepare(self, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict,
                 limit: Optional[int] = None) -> Optional[tuple[Any, ...]]:
        """Look ``k`` up and judge staleness: (found, value, meta, fingerprint, rejected).

        A hit whose digest matches needs no fingerprint record (only its
        digest, ``hit_digest``, when it can be had the short way): the record
        is built when the entry is missing (the save keeps it) or differs
        (``accept`` compares it). With ``limit`` (a read on the event loop):
        None when the entry is larger than ``limit`` bytes or in a side file
        (read it in a thread instead).

        The first step is the short look-up (``Checkpointer.lookup_call``
        with the key's checksum): one SELECT that settles a hit whose digest
        matches, or a miss; only what it cannot settle goes the full way.
        """
        policy = self._ck_stale or ckpt.stale
        fn = self.__wrapped__  # type: ignore[attr-defined]
        fp = None
        if policy == "ignore":
            digest = None
        else:
            digest = hit_digest(fn, args, kwargs)
            if digest is None:
                fp = ckpt.fingerprint(fn, args, kwargs)
                digest = None if fp is None else getattr(fp, "digest", None)
        # The key's checksum lets the store settle the call the short way; without
        # a digest (fingerprinting needed the whole record) it is judged in full.
        short = fp is None or digest is not None  # else: judged in full
        if limit is None:
            found, value, meta, settled = ckpt.lookup_call(k, digest, short)
        else:
            got = ckpt.lookup_call(k, digest, short, limit)
            if got is None:
                return None
            found, value, meta, settled = got
        if settled and found:
            return found, value, meta, fp, None
        if fp is None and digest is not None:
            # Missing (the save records the call) or maybe stale (judged on the record).
            fp = ckpt.fingerprint(fn, args, kwargs)
        if settled:
            return found, value, meta, fp, None
        if limit is not None:  # the short way could not tell the size (a store without it)
            head = ckpt.store.get_meta(k)
            if head is None:
                return False, None, {}, fp, None
            size = head.get("size")
            if not isinstance(size, int) or size > limit:
                return None
            found, value, meta = ckpt.lookup(k)
        # else lookup_call took the full way already: reading it again would
        # unpickle the value twice (a big array's memory doubled).
        rejected = None
        if found and fp is not None and not ckpt.accept(k, meta, fp, policy):
            found, rejected = False, meta.get("created", 0)
        return found, value, meta, fp, rejected

    def _invalid(self, k: str, value: Any) -> bool:
        """True when the validator rejects a hit's value (False, or it raised): the step runs again."""
        try:
            ok = self._ck_validate(value)  # type: ignore[misc]
        except Exception as e:  # any failure of the user's check means "do not trust this hit"
            logger.warning("Checkpoint %s: its validator raised %s: %s; running the step again",
                           k, type(e).__name__, e)
            return True
        if ok:
            return False
        logger.warning("Checkpoint %s: its validator rejected the saved result; running the step again", k)
        return True

    def _refingerprint(self, ckpt: Checkpointer, fp: Optional[dict[str, Any]], args: tuple,
                       kwargs: dict) -> Optional[dict[str, Any]]:
        """The fingerprints the rerun of a rejected hit saves (a hit settled the short way has none yet)."""
        if fp is not None or (self._ck_stale or ckpt.stale) == "ignore":
            return fp
        return ckpt.fingerprint(self.__wrapped__, args, kwargs)  # type: ignore[attr-defined]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.__wrapped__  # type: ignore[attr-defined]
        if self._ck_coro:
            if self._ck_disable or self._resolve() is None:
                return fn(*args, **kwargs)
            at = _call_site(1)
            ak = self._ck_k or _resolve_key(self._ck_key, fn, args, kwargs, at)
            # Nothing is counted or claimed before the coroutine starts: one
            # that is never awaited holds nothing.
            return self._run_async(ak, at, args, kwargs)
        # The checkpointer, counted in: the bound one or the facade's default
        # here; anything else (disabled, received, closing) through _acquire.
        ckpt = self._ck_bound
        if ckpt is None and self._ck_default is not None and not self._ck_received:
            ckpt = self._ck_default()
        if ckpt is None or self._ck_disable or not ckpt._enter():
            ckpt = self._acquire()
            if ckpt is None:
                return fn(*args, **kwargs)
        k = self._ck_k
        lease: Optional[Lease] = None
        flight: Optional[_Flight] = None
        owned: Optional[list[_Flight]] = None  # our own flight, once we have one (see _join_flight)
        handed_over = False
        try:
            site: Optional[str] = None
            if k is None:
                site = _call_site(1)
                k = _resolve_key(self._ck_key, fn, args, kwargs, site)
            found, value, meta, fp, rejected = self._prepare(ckpt, k, args, kwargs)
            if found:
                if self._ck_validate is None or not self._invalid(k, value):
                    ckpt.log_hit(k, meta)
                    return _ready(value) if meta.get("is_awaitable") else value
                # Rejected: a claim or wait must not hand this same entry back as a hit.
                value, rejected = None, meta.get("created", 0)
                fp = self._refingerprint(ckpt, fp, args, kwargs)
            if site is None:  # a string key: the call site is needed only by a save
                site = _call_site(1)
            if ckpt.dedup:
                owned = []
                while True:
                    # ``flight`` is set only to a flight of our own: the finally
                    # below ends it, and ending another caller's (we were
                    # interrupted while waiting for it, or found its result)
                    # would wake its waiters while its owner still computes.
                    theirs, mine = ckpt._join_flight(k, fn, False, owned)
                    if mine:
                        flight = theirs
                        break
                    _log_wait(k)
                    if not theirs.wait_sync():
                        if theirs.fn is fn:
                            # The owner is an awaitable on this thread's loop, made by this
                            # same function: ours is an awaitable too, that awaits theirs.
                            handed_over = True
                            cont = functools.partial(self._wait_then_run, ckpt, k, site, args, kwargs,
                                                     fp, rejected, theirs)
                            return _Pending(cont, None, functools.partial(_end_call, ckpt, None, None))
                        logger.info("Checkpoint %s is being computed by an awaitable on this thread's "
                                    "loop; a plain call cannot wait for it, so it computes too", k)
                        break
                    hit = ckpt.lookup(k)
                    if hit[0] and _fresh(hit[2], rejected):
                        ckpt.log_hit(k, hit[2])
                        return _ready(hit[1]) if hit[2].get("is_awaitable") else hit[1]
                lease, (found, value, meta) = ckpt.claim(k, rejected)
                if found:
                    ckpt.log_hit(k, meta)
                    return _ready(value) if meta.get("is_awaitable") else value
            started = time.perf_counter()
            ret = fn(*args, **kwargs)
            if type(ret) not in _NOT_AWAITABLE and inspect.isawaitable(ret):
                # A plain function that returned an awaitable: save what it
                # resolves to, and hand back an awaitable on hits.
                if flight is not None:
                    flight.became_awaitable()
                handed_over = True
                start = functools.partial(self._finish, ckpt, k, site, started, ret, lease, flight, fp)
                return _Pending(start, ret, functools.partial(_end_call, ckpt, lease, flight))
            ckpt.save(k, ret, **self._fields(site, started, False, fp))
            return ret
        finally:
            if flight is None and owned:
                flight = owned[0]  # interrupted as it became ours
            if not handed_over:
                if lease is None and flight is None:
                    ckpt._leave()  # a hit, or a plain miss: nothing else to end
                else:
                    _end_call(ckpt, lease, flight)

    async def _finish(self, ckpt: Checkpointer, k: str, site: str, started: float, pending: Awaitable[Any],
                      lease: Optional[Lease], flight: Optional[_Flight], fp: Optional[dict[str, Any]]) -> Any:
        try:
            value = await pending
        except GeneratorExit:  # closed mid-way: no awaiting now
            _submit(_end_call, ckpt, lease, flight)
            raise
        except BaseException:
            await _offload(_end_call, ckpt, lease, flight)
            raise
        await _offload(_save_and_end, ckpt, k, value, self._fields(site, started, True, fp), lease, flight)
        return value

    def _prepare_inline(
        self, lane: _Lane, ckpt: Checkpointer, k: str, args: tuple, kwargs: dict
    ) -> Optional[tuple[Any, ...]]:
        """``_prepare`` on the loop for a small call of a local store, or None (do it in a thread).

        A thread hop costs more than reading a small entry; a budget per
        loop iteration keeps the sum of such reads bounded, and anything
        large goes to a thread.
        """
        t0 = time.perf_counter()
        try:
            return self._prepare(ckpt, k, args, kwargs, INLINE_MAX_BYTES)
        except Exception:  # whatever it was, the thread path reports it properly
            return None
        finally:
            lane.spent += time.perf_counter() - t0

    async def _run_async(self, k: str, site: str, args: tuple, kwargs: dict) -> Any:
        ckpt = self._acquire()
        if ckpt is None:
            return await self.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # Driven by something other than asyncio (trio, a hand-rolled
            # send()): no loop to keep free, and no asyncio to wait with.
            return await self._run_without_asyncio(ckpt, k, site, args, kwargs)
        try:
            prepared = None
            lane = await _inline_turn()
            if ckpt.store.is_local and not _busy[0] and _small(args, kwargs):
                prepared = self._prepare_inline(lane, ckpt, k, args, kwargs)
            if prepared is None:
                prepared = await _offload(self._prepare, ckpt, k, args, kwargs)
        except BaseException:
            ckpt._leave()
            raise
        return await self._async_miss(ckpt, k, site, args, kwargs, prepared, None)

    async def _run_without_asyncio(self, ckpt: Checkpointer, k: str, site: str, args: tuple,
                                   kwargs: dict) -> Any:
        lease: Optional[Lease] = None
        try:
            found, value, meta, fp, rejected = self._prepare(ckpt, k, args, kwargs)
            if found and self._ck_validate is not None and self._invalid(k, value):
                found, value, rejected = False, None, meta.get("created", 0)
                fp = self._refingerprint(ckpt, fp, args, kwargs)
            if not found and ckpt.dedup:
                lease, (found, value, meta) = ckpt.claim(k, rejected)
            if found:
                ckpt.log_hit(k, meta)
                return value
            started = time.perf_counter()
            value = await self.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]
            ckpt.save(k, value, **self._fields(site, started, True, fp))
            return value
        finally:
            _end_call(ckpt, lease, None)

    async def _wait_then_run(self, ckpt: Checkpointer, k: str, site: str, args: tuple, kwargs: dict,
                             fp: Optional[dict[str, Any]], rejected: Any, theirs: _Flight) -> Any:
        return await self._async_miss(ckpt, k, site, args, kwargs, (False, None, {}, fp, rejected), theirs)

    async def _async_miss(self, ckpt: Checkpointer, k: str, site: str, args: tuple, kwargs: dict,
                          prepared: tuple[Any, ...], theirs: Optional[_Flight]) -> Any:
        """After the lookup: a hit, or wait for / take the key, run the step, save off the loop."""
        fn = self.__wrapped__  # type: ignore[attr-defined]
        found, value, meta, fp, rejected = prepared
        lease: Optional[Lease] = None
        flight: Optional[_Flight] = None
        try:
            if found and self._ck_validate is not None and self._invalid(k, value):
                found, value, rejected = False, None, meta.get("created", 0)
                fp = await _offload(self._refingerprint, ckpt, fp, args, kwargs)
            if not found and ckpt.dedup:
                while True:
                    if theirs is None:
                        theirs, mine = ckpt._join_flight(k, fn, True)
                        if mine:
                            flight, theirs = theirs, None
                            break
                    _log_wait(k)
                    await theirs.wait_async()
                    theirs = None
                    found, value, meta = await _offload(ckpt.lookup, k)
                    if found and _fresh(meta, rejected):
                        break
                    found = False
                if not found:
                    lease, (found, value, meta) = await ckpt.claim_async(k, rejected)
            if not found:
                started = time.perf_counter()
                ret = fn(*args, **kwargs)
                value = (await ret) if inspect.isawaitable(ret) else ret
        except GeneratorExit:  # closed mid-way: no awaiting now
            _submit(_end_call, ckpt, lease, flight)
            raise
        except BaseException:
            await _offload(_end_call, ckpt, lease, flight)
            raise
        # Past this point every path ends the call exactly once (an _offload
        # cancelled while waiting still finishes its work in the thread).
        if found:
            ckpt.log_hit(k, meta)
            if lease is None and flight is None:
                ckpt._leave()  # nothing to release: no thread hop
            else:
                await _offload(_end_call, ckpt, lease, flight)
            return value
        await _offload(_save_and_end, ckpt, k, value, self._fields(site, started, True, fp), lease, flight)
        return value


def _wrap(
    ckpt: Optional[Checkpointer],
    default: Optional[Callable[[], Optional[Checkpointer]]],
    key: Key,
    fn: Callable[..., Any],
    disable: bool = False,
    stale: Optional[str] = None,
    spec: Optional[StoreSpec] = None,
    received: bool = False,
    cls: type[CheckpointedFunction] = CheckpointedFunction,
    *,
    validate: Optional[Callable[[Any], Any]] = None,
) -> CheckpointedFunction:
    """The one way a wrapper is built: ``CheckpointedFunction(...)`` and the decorators come here.

    The argument order lets a decorator be a partial of it (``ckpt(key)``:
    ``partial(_wrap, ckpt, None, key)``), applied to the function later.
    """
    # Workflows make a wrapper per call (``apply_checkpoint(key)(f)(x)``):
    # what a function gives its wrapper is worked out once per function.
    try:
        state = _FN_STATE.get(fn)  # only callables are ever stored
    except TypeError:  # not weakly referable (nor hashable)
        state = None
    if state is None:
        if not callable(fn):
            raise TypeError(f"apply_checkpoint(...) must wrap a callable, not {type(fn).__name__}")
        state = _fn_state(fn)
    k: Optional[str] = None
    if isinstance(key, str):
        k = validate_key(key)  # fail at decoration time, before any step runs
    elif not callable(key):
        raise TypeError(f"a checkpoint key must be a str or a function of FnInfo, not {type(key).__name__}")
    if stale is not None:
        _check_policy(stale)
    if validate is not None and not callable(validate):
        raise TypeError(f"validate must be a function of the saved result, not {type(validate).__name__}")
    attrs, name, coro = state
    # functools.update_wrapper, from what was worked out once per function.
    w = _new_object(cls)
    d = w.__dict__
    d.update(attrs)
    fn_dict = getattr(fn, "__dict__", None)
    d["__wrapped__"] = fn
    d["_ck_key"] = key
    d["_ck_k"] = key if k is not None else None  # the key when it is a string (checked above)
    d["_ck_bound"] = ckpt
    d["_ck_name"] = name
    if fn_dict:
        d.update(fn_dict)
        d["__wrapped__"] = fn
        # Another wrapper's fields (a CheckpointedFunction wrapped again) must not leak into ours.
        d.update(_ck_key=key, _ck_k=key if k is not None else None, _ck_bound=ckpt, _ck_name=name,
                 _ck_disable=disable, _ck_stale=stale, _ck_default=default, _ck_spec=spec,
                 _ck_received=received, _ck_coro=coro, _ck_validate=validate)
    else:
        # The rest only when not the class's default.
        if disable:
            d["_ck_disable"] = disable
        if stale is not None:
            d["_ck_stale"] = stale
        if default is not None:
            d["_ck_default"] = default
        if spec is not None:
            d["_ck_spec"] = spec
        if received:
            d["_ck_received"] = received
        if coro:
            d["_ck_coro"] = coro
        if validate is not None:
            d["_ck_validate"] = validate
    if coro:
        _mark_coroutine_function(w, fn)
    return w


_new_object = object.__new__


def make_wrapper(
    fn: Callable[..., Any],
    key: Key,
    disable: bool,
    resolve: Callable[[], Optional[Checkpointer]],
    stale: Optional[str] = None,
    validate: Optional[Callable[[Any], Any]] = None,
) -> Callable[..., Any]:
    """Wrap ``fn``; ``resolve`` gives the checkpointer at call time (None: just run).

    ``resolve`` must be picklable by name (a module-level function) for the
    wrapper to travel; the facade passes its ``get_checkpointer``.
    """
    return _wrap(None, resolve, key, fn, disable, stale, validate=validate)


