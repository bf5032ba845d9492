"""ClientApp: train the adapters on the node's private Alpaca shard, on the cached emulator;
answer the server's question which partition this node holds."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from alpaca.task import client_query, client_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return client_train(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return client_query(msg, context)
