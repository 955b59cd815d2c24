// TEMPORARY dev harness (to be deleted).
use fluxfit::pipeline::{tiny, LoadOptions};
#[test]
#[ignore]
fn devserve() {
    let mut servers = vec![];
    for (port, v, key) in [
        (17861u16, None, None),
        (17862, Some(fluxfit::variant::Variant::DevFill), None),
        (17863, Some(fluxfit::variant::Variant::DevKontext), None),
        (17864, None, Some("sekrit".to_string())),
        (17865, Some(fluxfit::variant::Variant::DevCanny), None),
    ] {
        let model = tiny::load(LoadOptions {
            variant: v,
            ..Default::default()
        })
        .unwrap();
        let dir = format!("/tmp/devserve/{port}");
        let cfg = fluxfit_serve::Config {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            output_dir: dir.into(),
            api_key: key,
            ..Default::default()
        };
        servers.push(fluxfit_serve::Server::start(model, cfg).unwrap());
    }
    eprintln!("ready");
    while std::path::Path::new("/tmp/devserve/run").exists() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for s in servers {
        s.shutdown();
    }
}
