"""One run of a comparison, in its own process (``diffopt.compare.runs._run_in_subprocess``)."""

import json
import sys

from diffopt.compare.runs import run_one
from diffopt.config import resolve_config
from diffopt.evaluate import EvaluationProtocol

job = json.loads(sys.argv[1])
run_one(resolve_config(**job["config"]), EvaluationProtocol.from_record(job["protocol"]))
