"""ClientApp: say which partition this node holds, store the emulator, train the adapters on the
node's private Alpaca shard; under DP, Flower's own fixedclipping_mod clips the reply.

Loading this module imports Flower alone; each handler imports the library (torch,
transformers) on its node's first message. The simulation loads the ClientApp once in its own
process before it starts Ray, so importing the library here would hold back the start of every
client actor by the time that import takes (about 10 s on 2 cores), while the ServerApp imports
the same modules on the other core.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

app = ClientApp()


def dp_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    from fed_crash.federation import client

    return client.dp_clipping_mod(msg, context, call_next)


@app.query()
def partition(msg: Message, context: Context) -> Message:
    from fed_crash.federation import client

    return client.answer_partition(msg, context)


@app.train("emulator")
def emulator(msg: Message, context: Context) -> Message:
    from fed_crash.federation import client

    return client.receive_emulator(msg, context)


@app.train(mods=[dp_clipping])
def train(msg: Message, context: Context) -> Message:
    from fed_crash.federation import client

    return client.train(msg, context)
