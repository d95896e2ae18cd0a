"""The generation loop, engine-independent: continuous batching over an engine (mlx:
worker/engine_mlx.py; llama.cpp: worker/engine_llamacpp.py).

One thread (the caller of `Engine.run`) owns the engine and all output. Each loop turn it takes
the events the stdin reader has queued (without blocking while there is work), admits requests
into the batch, runs one engine step (a decode step for every sequence, plus prompt processing
for newcomers), turns tokens into protocol messages, and writes them in one flushed write.

Here, for every engine: the protocol (requests, cancel, stats, ping, shutdown), scheduling, the
context policy, prompts by core.prompt.encode_prompt as token ids, sampling settings, stop
strings, max_tokens, detokenisation, timings (worker/request.py: one request's parts). The
engine's part is the interface worker/engine_mlx.py describes.

Test-only hooks (environment variables, read once; documented in docs/PROTOCOL.md):
  WORKER_TEST_IGNORE_EOS=1   generation ends only by max_tokens, a stop string or cancel
  WORKER_TEST_FAULT=TEXT     a request whose last message contains TEXT raises inside the
                             worker at its first token (exercises the `internal` error)
  WORKER_TEST_PRINT=1        every admission print()s to sys.stdout and writes to fd 1
                             (the protocol stream must stay clean)
  WORKER_TEST_ECHO=TEXT      a request whose last message contains TEXT is answered with that
                             message first (worker/testhooks.py; the mlx engine only)
"""

import os
import queue
import time
from collections import deque

from core.prompt import encode_prompt
from worker import protocol, signals
from worker.io import EOF
from worker.request import Active, Refused, done_message, emit, fit, push, sampling_settings, system_end

MAX_EVENTS_PER_TURN = 256


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        settings,
        *,
        writer,
        log,
        context_length=None,
        max_queue=256,
        max_batch=32,
        prefix_cache_bytes=256 << 20,
        prefill_step_size=2048,
        hooks=None,
        engine=None,
    ):
        """`engine`: the engine the loop drives (default: mlx's on `model`, with the batch,
        prefix-cache and prefill settings given)."""
        self.tokenizer = tokenizer
        self.settings = settings
        self.gen_defaults = settings.generation
        self.system_prompt = settings.system_prompt
        self.writer = writer
        self.log = log
        self.context_length = context_length
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        hooks = os.environ if hooks is None else hooks
        self.ignore_eos = hooks.get("WORKER_TEST_IGNORE_EOS") == "1"
        self.fault_text = hooks.get("WORKER_TEST_FAULT") or None
        self.test_print = hooks.get("WORKER_TEST_PRINT") == "1"
        self.echo_marker = hooks.get("WORKER_TEST_ECHO") or None
        if engine is None:
            from worker.engine_mlx import MlxEngine

            engine = MlxEngine(
                model,
                tokenizer,
                log=log,
                max_batch=self.max_batch,
                ignore_eos=self.ignore_eos,
                prefix_cache_bytes=prefix_cache_bytes,
                prefill_step_size=prefill_step_size,
            )
        self.engine = engine
        self.vocab_size = engine.vocab_size

        self.by_id = {}  # id -> Active: accepted and not finished (batch + queue)
        self.by_uid = {}  # the engine's uid -> Active
        self.pending = deque()  # accepted, waiting for a batch slot
        self._sys_probe = {}

        self.left_batch = False  # a sequence left the batch this turn (engine.released)
        self.eof = False
        self.shutdown_reason = None
        self.stop_signal = False
        self.install_watchdog = False  # set by worker/signals.py's install (the real worker)
        self.started = time.time()
        self.served = 0
        self.errors = 0
        self.hits = 0
        self.misses = 0
        self.gen_tokens = 0
        self.decode_time = 0.0

    # ----------------------------------------------------------------- setup
    def warm_up(self):
        """One short generation, so the first request doesn't pay for first-call setup."""
        self.engine.warm_up(
            encode_prompt(self.tokenizer, [{"role": "user", "content": "Olá"}], self.system_prompt)
        )

    def ready_message(self, max_line_bytes, blas=None, version=None):
        gen = self.gen_defaults
        return protocol.ready_message(
            model=self.settings.model,
            adapter=self.settings.adapter,
            pid=os.getpid(),
            max_tokens=int(gen["max_tokens"]),
            max_tokens_cap=int(gen["max_tokens_cap"]),
            max_line_bytes=int(max_line_bytes),
            context_length=self.context_length,
            backend=self.engine.device,
            blas=blas,
            version=version or "",
        )

    # ----------------------------------------------------------------- loop
    def run(self, events):
        """Serve until EOF (after finishing everything read), shutdown or a signal. Returns 0."""
        while True:
            if self.stop_signal:
                self.cancel_all("SIGTERM")
                return 0
            idle = not self.by_id
            if idle and self.eof:
                self.writer.flush()
                self.log.info("stdin closed and all requests answered: exiting")
                return 0
            if idle:
                try:
                    event = events.get(timeout=0.2)
                except queue.Empty:
                    continue
                self.handle(event)
            for _ in range(MAX_EVENTS_PER_TURN):
                if self.shutdown_reason or self.stop_signal:
                    break
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    break
                self.handle(event)
            if self.shutdown_reason:
                self.cancel_all(self.shutdown_reason)
                return 0
            if self.pending:
                self.admit()
            if self.by_uid:
                self.step()
            if self.left_batch:
                self.left_batch = False
                self.engine.released()
            self.writer.flush()

    def handle(self, event):
        try:
            if isinstance(event, protocol.Generate):
                self.accept(event)
            elif isinstance(event, protocol.Control):
                self.control(event)
            elif isinstance(event, protocol.ParseError):
                if event.id is not None and event.id in self.by_id:
                    self.error(
                        event.id,
                        "duplicate_id",
                        f"a request with id {event.id!r} is already in flight (and this one "
                        f"was invalid: {event.message})",
                    )
                else:
                    self.error(event.id, event.code, event.message)
            elif event == EOF:
                self.eof = True
                self.log.info("stdin closed: finishing requests already read", in_flight=len(self.by_id))
        except Exception as e:  # never let one event take the loop down
            self.log.error(f"handling an event failed: {type(e).__name__}: {e}")
            rid = getattr(event, "id", None)
            if isinstance(event, protocol.Generate) and rid not in self.by_id:
                self.error(rid, "internal", f"{type(e).__name__}: {e}")

    def control(self, c):
        if c.op == "ping":
            self.writer.add(protocol.pong_message(c.id))
        elif c.op == "stats":
            self.writer.add(self.stats())
        elif c.op == "cancel":
            act = self.by_id.get(c.id)
            if act is None:
                self.log.info("cancel for an unknown or finished id: ignored", id=c.id)
            else:
                self.cancel(act)
        elif c.op == "shutdown":
            self.shutdown_reason = "shutdown"
            self.log.info("shutdown requested")
            if self.install_watchdog:
                signals.arm_exit_watchdog()

    def error(self, rid, code, message):
        self.errors += 1
        self.writer.add(protocol.error_message(rid, code, message))

    # ----------------------------------------------------------------- admission
    def accept(self, req):
        if req.id in self.by_id:
            self.error(req.id, "duplicate_id", f"a request with id {req.id!r} is already in flight")
            return
        fitted = self.fit_context(req)
        if fitted is None:
            return
        act = Active(req, ids=fitted.ids, dropped=fitted.dropped, max_tokens=fitted.max_tokens)
        messages = fitted.messages
        if self.fault_text and self.fault_text in messages[-1]["content"]:
            act.fault = True
        try:
            self.prepare(act, messages)
        except Exception as e:
            self.error(req.id, "internal", f"{type(e).__name__}: {e}")
            return
        if len(self.by_uid) < self.max_batch and not self.pending:
            self.by_id[act.id] = act
            self.start(act)
        elif len(self.pending) >= self.max_queue:
            self.error(
                req.id,
                "overloaded",
                f"{len(self.pending)} requests are already waiting (--max-queue {self.max_queue})",
            )
        else:
            self.by_id[act.id] = act
            self.pending.append(act)

    def fit_context(self, req):
        """The prompt after the context policy, or None after answering with the error."""
        try:
            return fit(
                self.tokenizer, self.system_prompt, self.gen_defaults, self.context_length, req, self.log
            )
        except Refused as e:
            self.error(req.id, e.code, e.message)
            return None

    def prepare(self, act, messages):
        settings = sampling_settings(act.req, self.gen_defaults, self.vocab_size)
        echo = messages if self.echo_marker and self.echo_marker in messages[-1]["content"] else None
        act.sampling = self.engine.sampling(*settings, act.req.seed, echo)
        act.sys_end = system_end(self.tokenizer, self._sys_probe, messages, act.ids)

    def admit(self):
        while self.pending and len(self.by_uid) < self.max_batch:
            self.start(self.pending.popleft())

    def start(self, act):
        try:
            self._start(act)
        except Exception as e:
            self.log.error(f"starting {act.id!r} failed: {type(e).__name__}: {e}")
            self.by_id.pop(act.id, None)
            if act.uid is not None:
                self.by_uid.pop(act.uid, None)
                self._end([act.uid])
            self.error(act.id, "internal", f"{type(e).__name__}: {e}")

    def _start(self, act):
        act.t_admitted = time.perf_counter()
        if self.test_print:
            print(f"test hook: print() to sys.stdout while admitting {act.id!r}")
            os.write(1, b"test hook: raw write to fd 1\n")
        act.uid, act.cached = self.engine.start(act.ids, act.sys_end, act.max_tokens, act.sampling)
        if act.cached > 0:
            self.hits += 1
        else:
            self.misses += 1
        act.detok = self.tokenizer.detokenizer
        self.by_uid[act.uid] = act

    # ----------------------------------------------------------------- decoding
    def step(self):
        tic = time.perf_counter()
        try:
            responses = self.engine.step()
        except Exception as e:
            self._batch_failed(e)
            return
        if responses:
            self.decode_time += time.perf_counter() - tic
            self.gen_tokens += len(responses)

        by_uid = self.by_uid
        stopped = []  # ended by a stop string: still in the batch
        failed = []
        for r in responses:
            act = by_uid.get(r[0])
            if act is None:
                continue
            try:
                if self._on_token(act, r):
                    stopped.append(act)
            except Exception as e:
                self.log.error(f"request {act.id!r} failed: {type(e).__name__}: {e}")
                self._drop(act)
                if r[2] is None:
                    failed.append(act.uid)
                self.error(act.id, "internal", f"{type(e).__name__}: {e}")
        if failed:
            self._end(failed)
        if stopped:
            self._end([a.uid for a in stopped], keep=True)
            for act in stopped:
                self._finish(act, "stop")
        if self.pending:
            self.admit()

    def _on_token(self, act, r):
        """Handle one generated token (uid, token, finish_reason). Returns True when a stop
        string ended the request (it must still leave the batch); finishes length/EOS itself."""
        _, token, finish = r
        now = time.perf_counter()
        detok = act.detok
        if finish == "stop":
            # The end-of-sequence token: not part of the text.
            detok.finalize()
            seg = detok.last_segment
            if seg:
                self._push(act, seg)
            self._finish(act, "stop")
            return False
        if act.fault:
            raise RuntimeError("test fault (WORKER_TEST_FAULT)")
        act.n_tokens += 1
        if act.t_first is None:
            act.t_first = now
        act.t_last = now
        detok.add_token(token)
        if finish is not None:
            detok.finalize()
        seg = detok.last_segment
        stopped = self._push(act, seg) if seg else False
        if stopped:
            if finish is None:
                return True
            self._finish(act, "stop")
        elif finish is not None:
            self._finish(act, finish)
        return False

    def _push(self, act, seg):
        return push(act, seg, self.writer)

    # ----------------------------------------------------------------- finishing
    def _finish(self, act, reason):
        if act.tail:  # not a stop: what was held back is text after all
            tail, act.tail = act.tail, ""
            emit(act, tail, self.writer)
        self._drop(act)
        self.writer.add(done_message(act, reason, self.settings))
        self.served += 1

    def _drop(self, act):
        self.by_id.pop(act.id, None)
        if act.uid is not None:
            self.by_uid.pop(act.uid, None)
            self.left_batch = True

    def _end(self, uids, keep=False):
        try:
            self.engine.end(uids, keep=keep)
        except Exception as e:
            self.log.error(f"removing from the batch failed: {type(e).__name__}: {e}; resetting it")
            self._reset_generator("internal", f"batch reset after {type(e).__name__}: {e}")

    def cancel(self, act):
        if act.uid is not None:
            self._end([act.uid])
        else:
            try:
                self.pending.remove(act)
            except ValueError:
                pass
        self._flush_detokenizer(act)
        self._finish(act, "cancelled")

    def _flush_detokenizer(self, act):
        """Text still inside the streaming detokenizer (a cancelled request's last bytes)."""
        if act.detok is None:
            return
        try:
            act.detok.finalize()
            seg = act.detok.last_segment
            if seg and act.tail is not None:
                self._push(act, seg)
        except Exception as e:
            self.log.warning(f"finalizing the text of {act.id!r} failed: {type(e).__name__}: {e}")

    def cancel_all(self, why):
        acts = list(self.by_id.values())
        if acts:
            self.log.info(f"{why}: cancelling {len(acts)} request(s)")
        uids = [a.uid for a in acts if a.uid is not None]
        if uids:
            try:
                self.engine.end(uids)
            except Exception:
                pass
        self.pending.clear()
        for act in acts:
            self._flush_detokenizer(act)
            self._finish(act, "cancelled")
        self.writer.flush()

    def _batch_failed(self, e):
        self.log.error(f"batch step failed: {type(e).__name__}: {e}")
        self._reset_generator("internal", f"generation failed: {type(e).__name__}: {e}")

    def _reset_generator(self, code, message):
        """A failure of the whole batch: its requests get an error, a fresh batch takes over."""
        for act in list(self.by_uid.values()):
            self._drop(act)
            self.error(act.id, code, message)
        self.by_uid.clear()
        self.engine.reset()

    # ----------------------------------------------------------------- stats
    def stats(self):
        return protocol.stats_message(
            **{
                "in_flight": len(self.by_uid),
                "queued": len(self.pending),
                "served": self.served,
                "errors": self.errors,
                "tokens_per_s": round(self.gen_tokens / self.decode_time, 3) if self.decode_time > 0 else 0.0,
                "prefix_cache": {"hits": self.hits, "misses": self.misses, **self.engine.cache_figures()},
                "memory": self.engine.memory(),
                "uptime_s": round(time.time() - self.started, 3),
                **({"limits": self.limits} if getattr(self, "limits", None) else {}),  # worker/limits.py
            }
        )
