"""`make bench` section **ttft**: time to first token through the worker with a >= 520-token
system prompt, `max_tokens: 1`: uncached (a nonce at its start) vs cached (the same system
prompt, another question), alternating."""

import shlex
import uuid

from bench import report
from bench.common import BENCH, log, rel

SECTION = "ttft"
PLAN = {
    "quick": dict(ttft_model=BENCH, ttft_reps=2, ttft_system_tokens=520),
    "full": dict(ttft_model=BENCH, ttft_reps=3, ttft_system_tokens=520),
}
FACTS = [
    "O Sporting Clube Farense foi fundado em 1910, em Faro, no Algarve.",
    "O clube joga no Estádio de São Luís, no centro da cidade de Faro.",
    "As cores do Farense são o preto e o branco, e o símbolo tem um leão.",
    "Os adeptos do clube chamam-lhe carinhosamente os Leões de Faro.",
    "O Farense chegou à final da Taça de Portugal em 1990 e jogou na Taça UEFA.",
    "Responde sempre em português de Portugal, de forma breve, correta e educada.",
    "Se não souberes a resposta, diz que não sabes e sugere o sítio oficial do clube.",
]


def long_system_prompt(tokenizer, min_tokens):
    text, k = "", 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < min_tokens:
        text += f"Facto {k + 1}: {FACTS[k % len(FACTS)]} "
        k += 1
    return text.strip()


def ttft_once(w, system, question):
    r = w.generate(
        {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 1,
            "temperature": 0,
            "stream": True,
        }
    )
    return {
        "client_ttft_ms": r.client_ttft_s() * 1000.0,
        "worker_ttft_ms": r.done["timing"]["ttft_ms"],
        "prompt_tokens": r.done["usage"]["prompt_tokens"],
        "cached_tokens": r.done["usage"]["cached_tokens"],
    }


def section(ctx):
    plan = ctx.plan
    model_dir = plan["ttft_model"]
    w = ctx.workers.main(model_dir)
    tokenizer = ctx.tokenizer(model_dir)
    system = long_system_prompt(tokenizer, plan["ttft_system_tokens"])
    out = {
        "model": rel(model_dir),
        "system_prompt_tokens": len(tokenizer.encode(system, add_special_tokens=False)),
        "max_tokens": 1,
        "worker_command": shlex.join(w.command),
        "uncached": [],
        "cached": [],
    }
    ctx.res[SECTION] = out
    ttft_once(w, system, "Olá! Quem és tu?")  # fills the prefix cache (unmeasured)
    for rep in range(plan["ttft_reps"]):
        nonce = uuid.uuid4().hex[:12]
        for which in ("uncached", "cached") if rep % 2 == 0 else ("cached", "uncached"):
            q = f"Pergunta {rep + 1} ({which}): em que ano foi fundado o clube?"
            sp = f"Sessão {nonce}. {system}" if which == "uncached" else system
            out[which].append(ttft_once(w, sp, q))
        unc, cac = out["uncached"][-1], out["cached"][-1]
        log(
            f"ttft rep {rep + 1}/{plan['ttft_reps']}: uncached {unc['client_ttft_ms']:.0f} ms "
            f"(cached_tokens {unc['cached_tokens']}), cached {cac['client_ttft_ms']:.0f} ms "
            f"(cached_tokens {cac['cached_tokens']} of {cac['prompt_tokens']})"
        )
    for which in ("uncached", "cached"):
        out[which + "_summary"] = report.summarize([r["client_ttft_ms"] for r in out[which]])
        out[which + "_worker_summary"] = report.summarize([r["worker_ttft_ms"] for r in out[which]])


def rows(res):
    tt = res.get(SECTION)
    if not tt:
        return []
    med = lambda k: report.median_of(tt, k)
    samples = lambda k: [r.get("client_ttft_ms") for r in (tt.get(k) or [])]
    return [
        report.row(
            f"first token, {tt['system_prompt_tokens']}-token system prompt",
            med("cached_summary"),
            med("uncached_summary"),
            "ms",
            ours_label="cached",
            anchor_label="uncached",
            target_key="ttft_cached",
            paired=report.paired_ratio(samples("cached"), samples("uncached")),
        ),
        report.row(
            "first token, worker's own ttft_ms",
            med("cached_worker_summary"),
            med("uncached_worker_summary"),
            "ms",
            ours_label="cached",
            anchor_label="uncached",
        ),
    ]


def models_note(plan):
    return f"first token on {rel(plan['ttft_model'])} ({plan['ttft_reps']} reps each)"
