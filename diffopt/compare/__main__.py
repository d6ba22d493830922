"""``python -m diffopt.compare``: the run server a comparison forks its runs from
(``diffopt.compare.server``), torch and diffopt's comparison imported once for every child."""

import diffopt.compare.runs  # noqa: F401
from diffopt.compare.server import serve

serve()
