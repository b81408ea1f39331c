// The Node producer of tests/test_node_producer.py: celery-node as its README shows it,
// client.sendTask(name, [], kwargs) to the queue "totango". Exits non-zero if any publish
// fails (a refused queue declaration rejects the publish).
//
//   node produce.js <broker url> <events.json>
"use strict";

const fs = require("fs");
const celery = require("celery-node");

// Under the test's own 60 s timeout for the whole script.
const START_TIMEOUT_MS = 30000;

async function main() {
  const [brokerUrl, eventsPath] = process.argv.slice(2);
  const events = JSON.parse(fs.readFileSync(eventsPath, "utf8"));
  // The result backend on the same broker (and vhost or database): nothing leaves the test's
  // own broker space.
  const client = celery.createClient(brokerUrl, brokerUrl, "totango");
  // sendTask does not return its publish; keep each one the client makes, to wait for them.
  const publishes = [];
  const publish = client.broker.publish.bind(client.broker);
  client.broker.publish = (...args) => {
    const done = publish(...args);
    publishes.push(done);
    return done;
  };
  await client.isReady();
  for (const event of events) {
    client.sendTask(event.task, [], event.kwargs);
  }
  // sendTask publishes once its own isReady() has answered, and that asserts the exchange
  // and the queue again: a broker round trip per task, so wait on the clock, not on a count
  // of event-loop turns (a loaded machine took longer than 10,000 turns).
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (publishes.length < events.length) {
    if (Date.now() > deadline) {
      throw new Error(`only ${publishes.length} of ${events.length} publishes started`);
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  await Promise.all(publishes);
  await client.disconnect();
  console.log(`published ${publishes.length}`);
}

main().then(
  () => process.exit(0),
  (error) => {
    console.error(`celery-node failed: ${error && error.message ? error.message : error}`);
    process.exit(1);
  },
);
