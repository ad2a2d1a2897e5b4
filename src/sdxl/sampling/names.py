"""Sampler and schedule names: ours, A1111's labels, ComfyUI's and A1111's aliases, and which ones we run.

Our names are k-diffusion's (`dpmpp_2m`, `euler_a`, `karras`). A1111 writes labels into its infotexts
("Sampler: DPM++ 2M, Schedule type: Karras"); ComfyUI writes its own names (`euler_ancestral`, `uni_pc`).
The tables below hold every sampler and schedule label A1111 writes, including those this project cannot
run (PLMS, DPM fast, Restart, ...), so that their infotexts read back into names, plus the names only we
have (`unipc_bh1`, the diffusers spacings `leading`/`trailing`/`linspace`) and `tcd` (labelled "TCD", as
the A1111 forks and extensions that add it do). The `runnable` column must list exactly the samplers of
`samplers.SAMPLER_INFO` and the schedules of `schedules.SCHEDULES` (a test checks it).

Two kinds of lookup:
- `resolve_sampler` / `resolve_schedule` (requests): any spelling -> a name we can run, else ValueError.
- `sampler_label` / `schedule_label` (writing infotexts) and `parse_sampler_label` / `parse_schedule_label`
  (reading them): any known spelling, runnable or not; an unknown one is passed through unchanged.

A1111's "Automatic" schedule gives each sampler its preferred schedule (`automatic_schedule`).

This module imports nothing heavy: the PNG readers and request validation use it without loading torch.
"""

from __future__ import annotations

from typing import NamedTuple

_AUTOMATIC_FALLBACK = "uniform"  # A1111: a sampler without a preference gets the model's own sigmas


class _Sampler(NamedTuple):
    label: str  # A1111's label
    runnable: bool  # in samplers.SAMPLER_INFO
    automatic: str = _AUTOMATIC_FALLBACK  # the schedule A1111's "Automatic" picks


# Every sampler A1111 1.10 lists, and ours. Two of ours share A1111's "UniPC": that label reads back as
# `unipc` (the bh2 variant, diffusers' default); `unipc_bh1` is ComfyUI's `uni_pc`.
_SAMPLERS: dict[str, _Sampler] = {
    "euler": _Sampler("Euler", True),
    "euler_a": _Sampler("Euler a", True),
    "heun": _Sampler("Heun", True),
    "dpm_2": _Sampler("DPM2", True, "karras"),
    "dpm_2_a": _Sampler("DPM2 a", True, "karras"),
    "lms": _Sampler("LMS", True),
    "dpmpp_2m": _Sampler("DPM++ 2M", True, "karras"),
    "dpmpp_2m_sde": _Sampler("DPM++ 2M SDE", True, "exponential"),
    "dpmpp_2m_sde_heun": _Sampler("DPM++ 2M SDE Heun", True, "exponential"),
    "dpmpp_3m_sde": _Sampler("DPM++ 3M SDE", True, "exponential"),
    "dpmpp_sde": _Sampler("DPM++ SDE", True, "karras"),
    "dpmpp_2s_a": _Sampler("DPM++ 2S a", True, "karras"),
    "ddim": _Sampler("DDIM", True, "ddim_uniform"),
    "unipc": _Sampler("UniPC", True),
    "unipc_bh1": _Sampler("UniPC", True),
    "lcm": _Sampler("LCM", True),
    "tcd": _Sampler("TCD", True),
    "dpm_fast": _Sampler("DPM fast", False),
    "dpm_adaptive": _Sampler("DPM adaptive", False),
    "restart": _Sampler("Restart", False, "karras"),
    "ddim_cfgpp": _Sampler("DDIM CFG++", False, "ddim_uniform"),
    "plms": _Sampler("PLMS", False),
}

# Our name -> A1111's label, for every sampler above (written into PNG infotexts).
A1111_SAMPLER_NAMES: dict[str, str] = {name: s.label for name, s in _SAMPLERS.items()}
RUNNABLE_SAMPLERS: tuple[str, ...] = tuple(name for name, s in _SAMPLERS.items() if s.runnable)

# Every schedule type A1111 1.9+ lists, and ours (the diffusers spacings). "automatic" is not a schedule but
# the choice "the sampler's preferred one" (`resolve_schedule`). A1111's "Normal" is k-diffusion's
# fractional-timestep schedule (our `uniform`), close to but not sgm's `normal`.
A1111_SCHEDULE_NAMES: dict[str, str] = {
    "automatic": "Automatic",
    "normal": "Normal",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "leading": "Leading",
    "trailing": "Trailing",
    "linspace": "Linspace",
    "polyexponential": "Polyexponential",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
}
RUNNABLE_SCHEDULES: tuple[str, ...] = (
    "normal", "uniform", "leading", "trailing", "linspace", "karras", "exponential", "sgm_uniform", "simple",
    "ddim_uniform", "beta", "align_your_steps", "kl_optimal", "polyexponential",
)  # fmt: skip


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().split())


# Every accepted spelling (normalised) -> our sampler name (runnable or not).
_SAMPLER_ALIASES: dict[str, str] = {name: name for name in _SAMPLERS}
_SAMPLER_ALIASES.update(
    {_norm(s.label): name for name, s in _SAMPLERS.items() if name != "unipc_bh1"}  # "UniPC" -> unipc (bh2)
)
_SAMPLER_ALIASES.update(
    {
        # ComfyUI
        "euler_ancestral": "euler_a",
        "dpm_2_ancestral": "dpm_2_a",
        "dpmpp_2s_ancestral": "dpmpp_2s_a",
        "dpmpp_sde_gpu": "dpmpp_sde",
        "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
        "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
        "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
        "uni_pc": "unipc_bh1",
        "uni_pc_bh2": "unipc",
        # A1111 aliases (the "_ka" / "_exp" suffixed ones are handled in `_split_sampler`)
        "k_euler": "euler",
        "k_euler_a": "euler_a",
        "k_euler_ancestral": "euler_a",
        "k_heun": "heun",
        "k_lms": "lms",
        "k_dpm_2": "dpm_2",
        "k_dpm_2_a": "dpm_2_a",
        "k_dpmpp_2s_a": "dpmpp_2s_a",
        "k_dpmpp_2m": "dpmpp_2m",
        "k_dpmpp_sde": "dpmpp_sde",
        "k_dpmpp_2m_sde": "dpmpp_2m_sde",
        "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
        "k_dpmpp_3m_sde": "dpmpp_3m_sde",
        "k_dpm_fast": "dpm_fast",
        "k_dpm_ad": "dpm_adaptive",
        "euler ancestral": "euler_a",
    }
)

# Every accepted schedule spelling (normalised) -> our schedule name (runnable or not, and "automatic").
_SCHEDULE_ALIASES: dict[str, str] = {name: name for name in A1111_SCHEDULE_NAMES}
_SCHEDULE_ALIASES.update({_norm(label): name for name, label in A1111_SCHEDULE_NAMES.items()})
_SCHEDULE_ALIASES.update({"sgmuniform": "sgm_uniform", "ddim": "ddim_uniform", "auto": "automatic",
                          "ays": "align_your_steps",
                          "alignyourstepsscheduler": "align_your_steps"})  # ComfyUI's node for AYS


def _split_sampler(key: str, runnable_only: bool) -> tuple[str, str | None] | None:
    """A normalised sampler spelling -> (our name, schedule it carries or None); None if unknown.

    Before 1.9, A1111 put the schedule into the sampler's name ("DPM++ 2M Karras"), and its aliases carry
    it as a suffix ("k_dpmpp_2m_ka", "..._exp").
    """
    if key in _SAMPLER_ALIASES:
        return _SAMPLER_ALIASES[key], None
    for label in sorted(_SCHEDULE_ALIASES, key=len, reverse=True):  # "DPM++ 2M SDE Karras", "... SGM Uniform"
        schedule = _SCHEDULE_ALIASES[label]
        if schedule == "automatic" or (runnable_only and schedule not in RUNNABLE_SCHEDULES):
            continue
        base = key[: -len(label) - 1]
        if key.endswith(" " + label) and base in _SAMPLER_ALIASES:
            return _SAMPLER_ALIASES[base], schedule
    for suffix, schedule in (("_ka", "karras"), ("_exp", "exponential")):
        if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_ALIASES:
            return _SAMPLER_ALIASES[key[: -len(suffix)]], schedule
    return None


# ------------------------------------------------------------------------------------------------- requests
def resolve_sampler(name: str) -> tuple[str, str | None]:
    """A sampler name in our, A1111's or ComfyUI's spelling -> (canonical name, implied schedule or None).

    Old A1111 names carry the schedule ("DPM++ 2M Karras" -> ("dpmpp_2m", "karras"), as do its aliases
    "k_dpmpp_2m_ka" / "..._exp"); A1111 1.9+ keeps it in a separate "Schedule type" and plain names imply
    none. Matching ignores case and repeated spaces. Raises ValueError listing the valid names, also for an
    A1111 sampler this project cannot run (PLMS, DPM fast, ...).
    """
    found = _split_sampler(_norm(name), runnable_only=True)
    valid = ", ".join(list(RUNNABLE_SAMPLERS) + sorted({A1111_SAMPLER_NAMES[n] for n in RUNNABLE_SAMPLERS}))
    if found is not None and found[0] not in RUNNABLE_SAMPLERS:
        raise ValueError(f"sampler {name!r}: an A1111 sampler this project does not implement; valid: "
                         f"{valid}")
    if found is None:
        raise ValueError(
            f"unknown sampler {name!r}; valid: {valid} (ComfyUI names and A1111 '<sampler> <schedule>' also "
            "work)"
        )
    return found


def automatic_schedule(sampler: str | None) -> str:
    """The schedule A1111's "Automatic" gives `sampler`: its preferred one (DPM++ 2M -> karras,
    DPM++ 2M SDE -> exponential, ...), otherwise the model's default `uniform`."""
    if sampler is None:
        return _AUTOMATIC_FALLBACK
    return _SAMPLERS[resolve_sampler(sampler)[0]].automatic


def is_automatic(schedule: str | None) -> bool:
    """Whether a schedule name leaves the choice to the sampler (None, "", "Automatic", "auto")."""
    return schedule is None or _norm(schedule) in ("", "automatic", "auto")


def resolve_schedule(name: str | None, sampler: str | None = None) -> str:
    """A schedule name in our, A1111's ("Karras", "SGM Uniform", "Automatic", ...) or ComfyUI's spelling ->
    canonical name. None, "" and "Automatic" resolve through `automatic_schedule(sampler)`.
    Raises ValueError listing the valid names (also for an A1111 schedule we cannot run)."""
    if is_automatic(name):
        return automatic_schedule(sampler)
    found = _SCHEDULE_ALIASES.get(_norm(name))
    if found in RUNNABLE_SCHEDULES:
        return found
    labels = sorted({A1111_SCHEDULE_NAMES[n] for n in ("automatic", *RUNNABLE_SCHEDULES)})
    valid = f"valid: {', '.join(RUNNABLE_SCHEDULES)} (or {', '.join(labels)})"
    if found is not None:
        raise ValueError(f"schedule {name!r}: an A1111 schedule this project does not implement; {valid}")
    raise ValueError(f"unknown schedule {name!r}; {valid}")


# ------------------------------------------------------------------------------------------------ infotexts
def sampler_label(name: str) -> str:
    """Any known sampler spelling (ours, ComfyUI's, '_gpu' variants) -> A1111's label ('dpmpp_2m' ->
    'DPM++ 2M'); an unknown name is returned unchanged."""
    found = _SAMPLER_ALIASES.get(_norm(name))
    return A1111_SAMPLER_NAMES[found] if found is not None else name


def schedule_label(name: str) -> str:
    """Any known schedule spelling -> A1111's label ('karras' -> 'Karras'); unknown names unchanged."""
    found = _SCHEDULE_ALIASES.get(_norm(name))
    return A1111_SCHEDULE_NAMES[found] if found is not None else name


def parse_sampler_label(label: str) -> tuple[str, str | None]:
    """An infotext's "Sampler" -> (our name, the schedule an old combined label carries, or None).

    'DPM++ 2M' -> ('dpmpp_2m', None), 'DPM++ 2M Karras' -> ('dpmpp_2m', 'karras'), 'PLMS' -> ('plms',
    None) (known, though we cannot run it). An unknown sampler keeps its text; a schedule label at its
    end is still split off ('Mystery Karras' -> ('Mystery', 'karras')).
    """
    found = _split_sampler(_norm(label), runnable_only=False)
    if found is not None:
        return found
    for option in sorted(_SCHEDULE_ALIASES, key=len, reverse=True):
        if label.lower().endswith(" " + option) and _SCHEDULE_ALIASES[option] != "automatic":
            return label[: -len(option) - 1], _SCHEDULE_ALIASES[option]
    return label, None


def parse_schedule_label(label: str) -> str:
    """An infotext's "Schedule type" -> our name ('Karras' -> 'karras', 'Automatic' -> 'automatic');
    unknown labels unchanged."""
    return _SCHEDULE_ALIASES.get(_norm(label), label)
