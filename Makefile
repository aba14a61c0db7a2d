# Shortcuts for ./run.sh, which does the work (it needs only bash and Python 3.11).
.PHONY: setup demo test bench lint clean

setup demo test bench lint:
	./run.sh $@

clean:
	rm -rf .venv out .pytest_cache .hypothesis
