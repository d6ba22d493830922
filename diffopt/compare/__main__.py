"""``python -m diffopt.compare``: the run server a comparison forks its runs from
(``diffopt.compare.server``)."""

from diffopt.compare.server import serve

serve()
