"""The Space entry: build the qie web app and serve it (see `qie.app.main`; `python app.py --help`)."""

from qie.app.main import build_demo, main

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    main()
