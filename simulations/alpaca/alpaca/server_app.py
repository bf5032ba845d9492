"""ServerApp: build the emulator once, federate adapter training, plug in and evaluate each round."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from alpaca.task import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)
