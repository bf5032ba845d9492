"""ClientApp: train the adapters on the node's private Alpaca shard, on the cached emulator."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from alpaca.task import client_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client_train(msg, context)
