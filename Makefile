# Two entry points (see README): `make lab` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Smoke mode shrinks notebook and training sizes so the suite fits CI (2 CPU cores, no GPU).
TEST_ENV := UMV2_SMOKE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0 TQDM_DISABLE=1

.PHONY: setup lab notebooks test test-fast bench gpu-check clean
.PHONY: git-filters test-browser

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (umv2)"
	touch $(STAMP)

## The main job: open the numbered notebooks in JupyterLab.
# JupyterLab refuses to run as root (containers, cloud notebooks) unless told to.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup git-filters
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) notebooks/

## git sees notebooks without their outputs (.gitattributes, tools/nbstrip.py): outputs autosaved by
# JupyterLab never reach a commit or `git diff`; edited cells do.  Only inside a git checkout.
git-filters:
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git config filter.nbstrip.clean "python3 tools/nbstrip.py"; \
		echo "git: notebook outputs are filtered (filter.nbstrip in .git/config)"; fi

## Execute every notebook headless (full sizes unless UMV2_SMOKE=1) and render HTML into build/ that
# works offline: local MathJax, each widget's default view as a static image (tools/render_html.py).
# One thread: the models are tiny, and on a shared CPU extra threads make them many times slower.
notebooks: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) tools/render_html.py --out build --timeout 1800 notebooks/[0-9][0-9]_*.ipynb

## The whole test suite: lint (ruff, pyproject.toml), reference, kernels (Triton interpreter on CPU), training, notebooks.
test: setup
	$(VENV)/bin/ruff check .
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 --durations=0 --timeout=900 \
		--nbval-lax --nbval-current-env -p no:cacheprovider tests notebooks

## Real-browser test: notebooks 01, 02, 04 run in JupyterLab in headless Chromium, a slider redraws, and
# the offline HTML typesets its math.  Installs Debian's chromium + chromium-driver when missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

test-browser: setup
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; fi
	UMV2_BROWSER=1 $(TEST_ENV) $(PY) -m pytest -v -p no:cacheprovider --timeout=900 tests/test_browser.py

## Only the Python tests (no notebooks), for quick iteration.
test-fast: setup
	$(TEST_ENV) $(PY) -m pytest -n 2 --dist loadfile --max-worker-restart=0 -q -p no:cacheprovider tests

bench: setup
	$(PY) -m kernels.bench

## One-shot GPU check on one H100/H200 (budget: under 8 minutes): the GPU tests, the sm_90a compile
## report (kernels/aot_report/), the benchmark, whose table replaces the measured section of kernels/README.md.
gpu-check: setup
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check needs a CUDA GPU')"
	$(PY) -m pytest -m gpu -q -p no:cacheprovider --durations=10 tests
	$(PY) -m kernels.aot
	$(PY) -m kernels.bench --readme

clean:
	rm -rf $(VENV) build
