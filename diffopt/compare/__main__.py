"""``python -m diffopt.compare``: the run server a comparison forks its runs from
(``diffopt.compare.server``)."""

from diffopt.compare.runs import run_job
from diffopt.compare.server import serve

serve(run_job)
