"""What a response answers: the extraction of the final answer (``\\boxed{}``, an ``Answer:`` line) and the local
fast path that decides plain numbers and same-form answers without math-verify.

Both run in the trainer's process for every response, so they are pure string work; ``reward.py`` scores with
them and sends only what they cannot decide to math-verify's worker processes.
"""

from __future__ import annotations

import re
from fractions import Fraction

# The DAPO/NFT template asks for a last line "Answer: $Answer"; markdown bold around the word is common.
_ANSWER_LINE = re.compile(r"(?i)\banswer\**\s*:\**[ \t]*([^\n]*\S)")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _brace_content(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``text[open_pos] == '{'``, or None when it never closes."""
    depth = 0
    for pos in range(open_pos, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : pos]
    return None


def _box_starts(text: str) -> list[tuple[int, int]]:
    """(start, end-of-command) of every ``\\boxed``/``\\fbox`` in text, in order."""
    return sorted(
        (match.start(), match.end())
        for command in _BOX_COMMANDS
        for match in re.finditer(re.escape(command) + r"(?![A-Za-z])", text)
    )


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` (brace-matched), else None.

    ``\\boxed 5`` (argument without braces, as in some MATH solutions) yields the next token. A last box whose
    braces never close (a truncated answer) is skipped in favour of the previous complete one.
    """
    for _, command_end in reversed(_box_starts(text)):
        rest = command_end
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _brace_content(text, rest)
            if content is not None:
                return content
        elif rest > command_end and rest < len(text):
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


def _clean_answer_line(line: str) -> str:
    line = line.strip()
    boxed = extract_boxed(line)
    if boxed is not None:
        return boxed.strip()
    # "Answer: $5$." -> "5": the trailing full stop and math delimiters are not part of the answer.
    line = line.rstrip(".").strip()
    if len(line) >= 2 and line[0] == "$" and line[-1] == "$":
        line = line.strip("$").strip()
    return line


def extract_answer(text: str, strict_box: bool = False, strict_box_tail_chars: int = 300) -> str | None:
    """The final answer a response commits to, or None when it states none.

    Default: whichever comes last of the last ``\\boxed{}`` and the last ``Answer: X`` line (what the DAPO/NFT
    and Qwen-Math templates ask for). ``strict_box``: only a ``\\boxed{}`` within the last
    ``strict_box_tail_chars`` characters counts, as in the released NFT/DAPO code's strict-box verification.
    """
    if strict_box:
        return extract_boxed(text[-strict_box_tail_chars:])
    answer_lines = list(_ANSWER_LINE.finditer(text))
    boxes = _box_starts(text)
    last_line_pos = answer_lines[-1].start() if answer_lines else -1
    last_box_pos = boxes[-1][0] if boxes else -1
    if last_line_pos > last_box_pos:
        return _clean_answer_line(answer_lines[-1].group(1))
    if boxes:
        return extract_boxed(text)
    return None


_SAME_FORM_DROP = re.compile(r"\s+|\$|\\left|\\right|\\!|\\,|\\;")


def _same_form(pred: str, gold: str) -> bool:
    """Cheap sufficient test of equality: identical up to whitespace, spacing and sizing commands."""

    def canon(s: str) -> str:
        s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
        return _SAME_FORM_DROP.sub("", s).rstrip(".")

    a, b = canon(pred), canon(gold)
    return bool(a) and a == b


# A plain number as answers write it: optional "x =", sign, thousands separators, decimals, a simple fraction,
# a trailing unit in \text{}. Anything else goes to math-verify.
_NUMBER = re.compile(
    r"""^(?:[A-Za-z]\s*=\s*)?(?P<sign>-)?\s*
    (?:(?P<int>\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.(?P<dec>\d+))?
      |\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}
      |(?P<num2>\d+)\s*/\s*(?P<den2>\d+))
    (?:\s*\\(?:text|mbox|mathrm)\{[^{}]*\})?$""",
    re.X,
)


def _exact_number(text: str) -> tuple[Fraction, bool] | None:
    """(exact value, is an integer literal) of a plain number, else None."""
    match = _NUMBER.match(text.strip().strip("$").strip())
    if match is None:
        return None
    num, den = match["num"] or match["num2"], match["den"] or match["den2"]
    if num is not None:
        if int(den) == 0:
            return None
        value, integer = Fraction(int(num), int(den)), False
    else:
        digits = match["int"].replace("{,}", "").replace(",", "")
        value = Fraction(f"{digits}.{match['dec']}") if match["dec"] else Fraction(int(digits))
        integer = match["dec"] is None
    return (-value if match["sign"] else value), integer


def decide_locally(pred: str, gold: str) -> bool | None:
    """The verdict when it needs no symbolic algebra, else None.

    Equal up to spacing, or equal exact numbers: correct. Two different integer literals: wrong. (Other
    numeric mismatches are left to math-verify, which compares with its own rounding tolerance.)
    """
    if _same_form(pred, gold):
        return True
    pred_number, gold_number = _exact_number(pred), _exact_number(gold)
    if pred_number is None or gold_number is None:
        return None
    if pred_number[0] == gold_number[0]:
        return True
    return False if pred_number[1] and gold_number[1] else None
